#!/usr/bin/env python3
"""Independent mock of the Rally CRM Companies API (variant).

Written only from /work/shared/api/rally-companies.txt, rally-notes.md, README.md and
pitfalls.md. Python 3 standard library only.

Start:
    python3 rally_server.py --port 9701 --api-key rk_test --companies N --rps 10 \
        --mutations-per-second 0 --seed 1

Behaviour (numbered spec; "doc" = rally-companies.txt, "notes" = rally-notes.md):

 1. Transport: binds 127.0.0.1 only, ThreadingHTTPServer, HTTP/1.1 keep-alive; every response
    carries Content-Length (204 sends "Content-Length: 0"). Request bodies may be sent with
    Content-Length or chunked transfer encoding. One log line per request on stderr:
    "METHOD path?query STATUS" (STATUS is "DROP" when the connection is dropped).
 2. Auth: header X-Api-Key must equal --api-key, else 401 with a JSON error body. Auth is
    checked before rate limiting: a 401 does not consume the rate budget. Admin endpoints
    (/__admin/...) are never authenticated, rate limited or faulted.
 3. Routes (paths matched case-insensitively, one trailing slash ignored):
      GET    /api/v1/companies             list (bare JSON array, no total, no next link)
      POST   /api/v1/companies             create -> 201 + CompanyResponse + Location header
      GET    /api/v1/companies/{id}        get -> 200 / 404 (a non-GUID id is a 404)
      PUT    /api/v1/companies/{id}        update -> 200 + CompanyResponse / 404 / 409
      DELETE /api/v1/companies/{id}        delete -> 204 empty / 404 (hard delete, no tombstone)
      PUT    /api/v1/companies/upsert      upsert by domain -> {"action","id"}
      POST   /api/v1/companies/bulk        bulk create-or-update, max 100 records
    Unknown paths -> 404, known path with wrong method -> 405 (Allow header); both JSON.
 4. List order: by updatedAt ASCENDING, then id (lowercase GUID string) ascending. A row that
    is updated while a client pages moves to the end of the list and shifts later offsets.
 5. updatedSince is EXCLUSIVE (updatedAt > updatedSince) and is applied before offset/limit.
    Any ISO-8601 form is accepted: "Z", "+hh:mm", "+hhmm", "+hh", fractional seconds of any
    length (compared to the microsecond), "T" or space separator, date-only (midnight).
    Without a zone it is taken as UTC. An unparseable value -> 400; note that an unencoded
    "+" in a query string decodes to a space, so "...00.123+00:00" sent raw -> 400 (what an
    ASP.NET vendor does).
 6. Timestamps are stored with millisecond precision and emitted as
    "2025-06-12T08:45:00.123+00:00" (always 3 fraction digits, "+00:00" suffix).
 7. limit: default 25; 1..100 accepted; > 100, < 1 or non-integer -> 400. offset: default 0,
    negative or non-integer -> 400, past the end -> []. A short page (< limit) is the last.
    Query parameter names are case-insensitive; the first occurrence wins.
 8. fields: comma-separated, case-insensitive property names; the answer holds only those
    properties plus "id" (always), in canonical order. An unknown name -> 400. Empty = all.
    Only the list endpoint honours fields.
 9. Rate limit: FIXED windows aligned to wall-clock seconds (int(time.time())); at most
    int(--rps) accepted calls per window (--rps <= 0 disables); excess -> 429 with
    "Retry-After: 1" and a JSON error; rejected calls do not count toward the window.
    Stats track max_requests_in_any_1s_window = the most non-admin arrivals (accepted and
    rejected) inside any sliding 1 s window, plus max_accepted_in_any_1s_window.
10. Error bodies: {"error": {"code": "...", "message": "..."}} (object, not a string).
    Codes: unauthorized, rate_limited, not_found, method_not_allowed, validation_error,
    invalid_json, unsupported_media_type, conflict, too_many_records, internal_error.
11. Request bodies: JSON; property names are matched case-insensitively (System.Text.Json web
    defaults); unknown and read-only properties (id, tenantId, createdAt, updatedAt) are
    ignored. A body with a Content-Type that is not JSON -> 415. Malformed JSON -> 400.
    Types are strict: strings must be strings, employeeCount a 32-bit integer (250.0 is
    rejected), annualRevenue a JSON number (a string is rejected) within .NET decimal range,
    tags an array of strings (null = []), ownerId a GUID (stored and emitted in canonical
    lowercase hyphenated form, whatever form was sent). name is required and must not be
    blank: "Company name is required".
12. annualRevenue is a decimal end to end: parsed with Decimal, stored as Decimal, emitted as
    a bare JSON number keeping the scale it was sent with (1.50 stays 1.50, 45000000 stays
    45000000, 98765432109876543.21 is exact). Never through float.
13. PUT /{id}, upsert-update and bulk-update are FULL REPLACEMENT of the writable fields
    (PUT semantics with a .NET DTO): a property absent from the body becomes null (tags -> []).
14. A write bumps updatedAt only if some value actually changed (strings compared exactly,
    so a domain case change IS a change; decimals compared numerically, and a numerically
    equal decimal keeps its stored representation; tags compared as ordered lists).
15. Domains: matched case-insensitively (after trimming), stored exactly as sent. Empty
    domain = no domain. POST create with a domain used by another company -> 409; PUT /{id}
    that CHANGES the domain (case-insensitively) to one used by another company -> 409
    (keeping a seeded duplicate domain unchanged is allowed).
16. Upsert: domain required (-> 400 without). Matches case-insensitively; if several companies
    share the domain (seed data has duplicates) the oldest (createdAt, then id) is updated.
    Answers 201 {"action":"created","id"} when it created, 200 {"action":"updated","id"} when
    it matched (even when nothing changed, in which case updatedAt is untouched).
17. Bulk: body must be a bare JSON array (else 400); more than 100 records -> 400 and nothing
    is written; an empty array -> 200 with zero counts. Records are processed in order, each
    independently: a record whose domain matches an existing company (including one created
    earlier in the same batch) updates it (rule 13/16), otherwise it is created. Response
    {"created","updated","failed","createdIds","errors":[{"index","error"}]}; createdIds in
    request order; 207 Multi-Status when any record failed, 200 when none failed.
18. Faults (POST /__admin/faults {"rate": r, "kinds": [...]}): a fraction r of authenticated,
    not-rate-limited API calls get one of (default all kinds):
      "500"       500 with an HTML body, write NOT applied
      "502"       502 with an nginx-like HTML body, write NOT applied
      "429"       429 with Retry-After: 2 and a JSON error, even under the limit; not applied;
                  counted in faults_injected, not in rate_limited
      "slow"      the call is applied, the correct answer is sent after 3 s
      "drop"      the call is applied (writes commit), then the connection is closed with no
                  response at all
      "malformed" the call is applied, then 200 with a JSON body cut in half (invalid JSON;
                  a DELETE gets a truncated JSON object)
19. Output JSON escaping follows System.Text.Json defaults: non-ASCII as \\uXXXX and the
    HTML-sensitive characters & ' < > + ` as \\u0026 \\u0027 \\u003C \\u003E \\u002B \\u0060
    inside string values (timestamps are not escaped). Any JSON parser reads it.
20. Seed data (--companies N, --seed S) is fully deterministic (ids, tenant, timestamps):
    names with accents and quotes, ~5 % deliberately duplicated names (plus natural collisions
    of common names such as "Acme Inc."), ~3 % duplicate domains (sometimes in
    another letter case), ~8 % without website/domain, some empty-string fields, websites
    like "https://www.example-123.com" or "example-123.com", postal codes with leading zeros,
    annualRevenue with 0 or 2 decimals and a few with more than 15 significant digits.
    Seeded timestamps lie before 2025-06-01T00:00:00Z; a group of max(30, N/8) companies
    (capped at 150, if N >= 40) share one identical createdAt/updatedAt (a bulk import), so
    more rows share a timestamp than a default page (and, for N >= 808, a max page) holds.
21. Mutator (--mutations-per-second R, 0 = off): a background thread that, R times a second,
    edits 1-3 fields of a random company (85 %) or creates one (15 %), through the same store
    code path as the API (so updatedAt bumps). It never deletes.
22. Admin (no auth, no limit, no faults):
      GET  /__admin/companies  JSON array of ALL companies in API form, in list order
      GET  /__admin/stats      requests, accepted, rate_limited, unauthorized,
                               max_requests_in_any_1s_window, max_accepted_in_any_1s_window,
                               faults_injected, faults_by_kind, status_counts, mutations,
                               companies, writes
      POST /__admin/mutate     {"id": ID, "fields": {...}} merges those fields (null clears;
                               name cannot be cleared) and ALWAYS bumps updatedAt;
                               without "id" creates a company from fields. 200 + company.
                               Lenient: annualRevenue may be a string; "createdAt"/"updatedAt"
                               in fields override the timestamps. Unknown id -> 404.
      POST /__admin/faults     {"rate": r, "kinds": [...]}; GET /__admin/faults shows config.
"""

import argparse
import bisect
import collections
import json
import random
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

FIELDS_ORDER = [
    "id", "tenantId", "name", "domain", "industry", "description", "employeeCount",
    "annualRevenue", "phone", "website", "linkedInUrl", "address", "city", "state",
    "country", "postalCode", "tags", "notes", "ownerId", "createdAt", "updatedAt",
]
WRITABLE = [
    "name", "domain", "industry", "description", "employeeCount", "annualRevenue", "phone",
    "website", "linkedInUrl", "address", "city", "state", "country", "postalCode", "tags",
    "notes", "ownerId",
]
STRING_FIELDS = {
    "name", "domain", "industry", "description", "phone", "website", "linkedInUrl",
    "address", "city", "state", "country", "postalCode", "notes",
}
FIELD_BY_LOWER = {f.lower(): f for f in FIELDS_ORDER}
WRITABLE_BY_LOWER = {f.lower(): f for f in WRITABLE}

DECIMAL_MAX = Decimal("79228162514264337593543950335")
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
FAULT_KINDS = ["500", "502", "429", "slow", "drop", "malformed"]


class ApiError(Exception):
    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


def now_ms():
    return int(time.time() * 1000)


# ---- timestamps -----------------------------------------------------------------------------

def fmt_ts(ms):
    dt = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ".%03d+00:00" % (ms % 1000)


_ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"(Z|z|[+-]\d{2}(?::?\d{2})?)?$"
)


def parse_iso_us(s):
    """ISO-8601 -> microseconds since the epoch (UTC). Raises ValueError."""
    m = _ISO_RE.match(s.strip())
    if not m:
        raise ValueError("not ISO-8601")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    dt = datetime(int(y), int(mo), int(d), int(hh or 0), int(mi or 0), int(ss or 0),
                  tzinfo=timezone.utc)
    us = int(dt.timestamp()) * 1_000_000
    if frac:
        us += int((frac + "000000")[:6])
    if tz and tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        body = tz[1:].replace(":", "")
        oh = int(body[:2])
        om = int(body[2:4]) if len(body) >= 4 else 0
        if oh > 23 or om > 59:
            raise ValueError("bad offset")
        us -= sign * (oh * 3600 + om * 60) * 1_000_000
    return us


# ---- JSON output (System.Text.Json-like escaping, decimals as bare numbers) ------------------

class Raw:
    __slots__ = ("s",)

    def __init__(self, s):
        self.s = s


_ESC = {ord("&"): "\\u0026", ord("'"): "\\u0027", ord("<"): "\\u003C", ord(">"): "\\u003E",
        ord("+"): "\\u002B", ord("`"): "\\u0060"}


def dec_str(d):
    s = format(d, "f")
    if s.startswith("-") and Decimal(s) == 0:
        s = s[1:]
    return s


def enc(v):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, Raw):
        return v.s
    if isinstance(v, Decimal):
        return dec_str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v).translate(_ESC)
    if isinstance(v, dict):
        return "{" + ",".join(enc(str(k)) + ":" + enc(x) for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(enc(x) for x in v) + "]"
    raise TypeError("cannot encode %r" % type(v))


def enc_bytes(v):
    return enc(v).encode("ascii")


def api_form(c, fields=None):
    out = {}
    for f in FIELDS_ORDER:
        if fields is not None and f not in fields:
            continue
        v = c[f]
        if f in ("createdAt", "updatedAt"):
            v = Raw('"' + fmt_ts(v) + '"')
        elif f == "tags":
            v = list(v)
        out[f] = v
    return out


def err_body(code, message):
    return enc_bytes({"error": {"code": code, "message": message}})


# ---- input validation -----------------------------------------------------------------------

def _reject_constant(name):
    raise ValueError("invalid JSON constant " + name)


def parse_json(raw):
    try:
        text = raw.decode("utf-8-sig")
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, "invalid_json", "Request body is not valid JSON: %s" % e)


def coerce_field(f, v, lenient=False):
    if f in STRING_FIELDS:
        if v is None or isinstance(v, str):
            return v
        raise ApiError(400, "validation_error", "%s must be a string or null" % f)
    if f == "employeeCount":
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            if lenient and isinstance(v, (str, Decimal)):
                try:
                    d = Decimal(v)
                    if d == d.to_integral_value():
                        v = int(d)
                except InvalidOperation:
                    pass
            if isinstance(v, bool) or not isinstance(v, int):
                raise ApiError(400, "validation_error", "employeeCount must be an integer or null")
        if not INT32_MIN <= v <= INT32_MAX:
            raise ApiError(400, "validation_error", "employeeCount is out of range")
        return v
    if f == "annualRevenue":
        if v is None:
            return None
        if isinstance(v, bool):
            raise ApiError(400, "validation_error", "annualRevenue must be a number or null")
        if isinstance(v, int):
            v = Decimal(v)
        elif isinstance(v, str) and lenient:
            try:
                v = Decimal(v.strip())
            except InvalidOperation:
                raise ApiError(400, "validation_error", "annualRevenue must be a number or null")
        if not isinstance(v, Decimal) or not v.is_finite():
            raise ApiError(400, "validation_error", "annualRevenue must be a number or null")
        if abs(v) > DECIMAL_MAX or -v.as_tuple().exponent > 28:
            raise ApiError(400, "validation_error", "annualRevenue is out of range for decimal")
        return v
    if f == "tags":
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            raise ApiError(400, "validation_error", "tags must be an array of strings")
        return list(v)
    if f == "ownerId":
        if v is None:
            return None
        if isinstance(v, str):
            try:
                return str(uuid.UUID(v.strip()))
            except ValueError:
                pass
        raise ApiError(400, "validation_error", "ownerId must be a GUID or null")
    raise ApiError(400, "validation_error", "unknown field %s" % f)


def validate_full(obj):
    """CreateCompanyRequest -> full set of writable fields (absent -> null / [])."""
    if not isinstance(obj, dict):
        raise ApiError(400, "validation_error", "Request body must be a JSON object")
    given = {}
    for k, v in obj.items():
        f = WRITABLE_BY_LOWER.get(str(k).lower())
        if f:
            given[f] = v
    out = {}
    for f in WRITABLE:
        if f in given:
            out[f] = coerce_field(f, given[f])
        else:
            out[f] = [] if f == "tags" else None
    if out["name"] is None or not out["name"].strip():
        raise ApiError(400, "validation_error", "Company name is required")
    return out


def dom_key(d):
    if d is None:
        return None
    k = d.strip().lower()
    return k or None


def values_equal(old, new):
    if isinstance(old, Decimal) and isinstance(new, Decimal):
        return old == new
    if isinstance(old, Decimal) or isinstance(new, Decimal):
        return False
    if type(old) is not type(new):
        return False
    return old == new


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------

class Store:
    def __init__(self, tenant_id):
        self.lock = threading.RLock()
        self.tenant_id = tenant_id
        self.by_id = {}
        self.domain_idx = collections.defaultdict(set)
        self._sorted = None
        self._sorted_keys = None
        self.writes = collections.Counter()

    # index helpers
    def _idx_add(self, c):
        k = dom_key(c["domain"])
        if k:
            self.domain_idx[k].add(c["id"])

    def _idx_del(self, c):
        k = dom_key(c["domain"])
        if k and k in self.domain_idx:
            self.domain_idx[k].discard(c["id"])
            if not self.domain_idx[k]:
                del self.domain_idx[k]

    def _dirty(self):
        self._sorted = None
        self._sorted_keys = None

    def find_by_domain(self, domain):
        k = dom_key(domain)
        if not k:
            return []
        with self.lock:
            cs = [self.by_id[i] for i in self.domain_idx.get(k, ())]
        cs.sort(key=lambda c: (c["createdAt"], c["id"]))
        return cs

    def get(self, cid):
        with self.lock:
            return self.by_id.get(cid)

    def insert(self, fields, cid=None, created=None, updated=None):
        with self.lock:
            ts = now_ms()
            c = {f: ([] if f == "tags" else None) for f in FIELDS_ORDER}
            c["id"] = cid or str(uuid.uuid4())
            c["tenantId"] = self.tenant_id
            for f, v in fields.items():
                if f in WRITABLE:
                    c[f] = list(v) if f == "tags" else v
            c["createdAt"] = created if created is not None else ts
            c["updatedAt"] = updated if updated is not None else c["createdAt"]
            self.by_id[c["id"]] = c
            self._idx_add(c)
            self._dirty()
            self.writes["created"] += 1
            return c

    def update(self, cid, fields, force_bump=False, created=None, updated=None):
        """Apply the given writable fields (merge of exactly those keys). Returns (c, changed)."""
        with self.lock:
            c = self.by_id[cid]
            changed = False
            for f, v in fields.items():
                if f not in WRITABLE:
                    continue
                if values_equal(c[f], v):
                    continue
                changed = True
                if f == "domain":
                    self._idx_del(c)
                    c[f] = v
                    self._idx_add(c)
                else:
                    c[f] = list(v) if f == "tags" else v
            if created is not None:
                c["createdAt"] = created
                changed = True
            if updated is not None:
                c["updatedAt"] = updated
                changed = True
            elif changed or force_bump:
                c["updatedAt"] = now_ms()
            if changed or force_bump:
                self._dirty()
                self.writes["updated"] += 1
            return c, changed

    def delete(self, cid):
        with self.lock:
            c = self.by_id.pop(cid, None)
            if c is None:
                return False
            self._idx_del(c)
            self._dirty()
            self.writes["deleted"] += 1
            return True

    def sorted_list(self):
        with self.lock:
            if self._sorted is None:
                lst = sorted(self.by_id.values(), key=lambda c: (c["updatedAt"], c["id"]))
                # snapshot copies so callers can encode outside the lock
                self._sorted = [dict(c, tags=list(c["tags"])) for c in lst]
                self._sorted_keys = [c["updatedAt"] * 1000 for c in self._sorted]
            return self._sorted, self._sorted_keys

    def count(self):
        with self.lock:
            return len(self.by_id)


# --------------------------------------------------------------------------------------------
# Seed data
# --------------------------------------------------------------------------------------------

NAME_STEMS = [
    "Acme", "Globex", "Initech", "Umbrella", "Stark Industries", "Wayne Enterprises", "Wonka",
    "Tyrell", "Cyberdyne", "Soylent", "Hooli", "Vandelay", "Dunder Mifflin", "Pied Piper",
    "Aperture", "Oscorp", "Nakatomi", "Monarch", "Virtucon", "Sterling Cooper", "Bluth",
    "Planet Express", "Massive Dynamic", "Blue Sun", "Northwind", "Contoso", "Fabrikam",
    "Tailspin", "Wingtip", "Litware", "Proseware", "Adventure Works", "Lamna", "Trey Research",
]
ACCENTED = [
    "Café Müller", "Société Générale d'Études", "Zürcher Ölwerke", "Łódź Przemysł",
    "São Paulo Comércio", "Fjørd & Ærø", "Ñandú Exportaciones", "Crème Brûlée Bakeries",
    "Škoda Díly", "Ångström Optik", "Çelik Yapı", "Dvořák Hudba", "Kraków Żegluga",
    "Østergaard Skibsfart", "Bäckerei Größe", "Müller-Lüdenscheidt", "Élan Vital",
    "東京テック", "Ærøskøbing Træ",
]
QUOTED = [
    "O'Brien & Sons", "\"Best\" Widgets", "Smith, Jones & Partners", "Ben & Jerry's Distributors",
    "The \"Real\" Deal", "Macy's Outlet", "L'Oréal Partenaires", "D'Angelo's <Pizza>",
    "Back\\Slash Systems", "50% Off + More", "Rock 'n' Roll Records",
]
QUALIFIERS = ["", "", "", "Labs", "Systems", "Logistics", "Digital", "Solutions", "Partners",
              "Analytics", "Foods", "Energy", "Software", "Consulting", "Medical", "Robotics",
              "Textiles", "Freight", "Media", "Capital", "Bau", "Technologies"]
SUFFIXES = ["Inc.", "LLC", "GmbH", "Ltd", "S.A.", "AG", "Corp.", "Group", "Holdings", "& Co.",
            "", "", "", "SARL", "Sp. z o.o.", "AB", "Ltda", "K.K."]
SLUGS = ["example", "acme", "globex", "northwind", "contoso", "fabrikam", "initech", "umbrella",
         "tailspin", "wingtip", "adventure-works", "litware", "proseware", "hooli", "lamna"]
TLDS = [".com"] * 7 + [".de", ".co.uk", ".io", ".fr", ".com.br"]
INDUSTRIES = ["Technology", "Manufacturing", "Retail", "Healthcare", "Finance", "Education",
              "Logistics", "Energy", "Hospitality", "Media & Entertainment", "Real Estate",
              "Agriculture", "Consulting", "Telecommunications"]
TAGS = ["enterprise", "smb", "technology", "partner", "prospect", "customer", "churned", "vip",
        "emea", "apac", "na", "latam", "q3-campaign", "renewal"]
LOCATIONS = [
    ("San Francisco", "CA", "US", "United States", "94105", "{n} Market Street", "+1-415-555-{d4}"),
    ("New York", "NY", "US", "United States", "10001", "{n} Broadway", "(212) 555-{d4}"),
    ("Boston", "MA", "US", "USA", "02134", "{n} Beacon Street", "+1 617 555 {d4}"),
    ("Austin", "TX", "US", "United States", "73301", "{n} Congress Ave, Suite 200", "+1-512-555-{d4}"),
    ("Berlin", None, "DE", "Germany", "10115", "Friedrichstraße {n}", "+49 30 {d4}{d3}"),
    ("München", "BY", "DE", "Deutschland", "80331", "Maximilianstraße {n}", "+49 (0)89 {d4}-{d3}"),
    ("Paris", None, "FR", "France", "75001", "{n} rue de Rivoli", "+33 1 {d2} {d2} {d2} {d2}"),
    ("Zürich", "ZH", "CH", "Switzerland", "8001", "Bahnhofstrasse {n}", "+41 44 {d3} {d2} {d2}"),
    ("São Paulo", "SP", "BR", "Brasil", "01310-100", "Avenida Paulista, {n}", "+55 11 9{d4}-{d4}"),
    ("Kraków", None, "PL", "Poland", "31-042", "ul. Floriańska {n}", "+48 12 {d3} {d2} {d2}"),
    ("London", None, "GB", "United Kingdom", "EC1A 1BB", "{n} Baker Street", "+44 20 {d4} {d4}"),
    ("Toronto", "ON", "CA", "Canada", "M5H 2N2", "{n} Bay Street", "+1 (416) 555-{d4}"),
    ("København", None, "DK", "Denmark", "1050", "Strøget {n}", "+45 {d2} {d2} {d2} {d2}"),
    ("Tokyo", None, "JP", "Japan", "100-0005", "1-{n} Marunouchi, Chiyoda-ku", "+81 3-{d4}-{d4}"),
]
DESCRIPTIONS = [
    "Enterprise software solutions provider",
    "Family-owned business since 1952 — now in its third generation.",
    "Leading supplier of \"premium\" widgets & gadgets",
    "B2B marketplace for industrial parts.\nOffices in 3 countries.",
    "Spécialiste de la logistique européenne",
    "Cloud-native analytics (SaaS) for SMBs",
    "Hersteller von Präzisionsteilen für die Automobilindustrie",
    "Non-profit; tax-exempt under 501(c)(3)",
    "Café chain with 40+ locations",
]
NOTES = [
    "Met at SaaStr 2024", "Prefers email over phone", "Renewal due Q3 — talk to legal first",
    "Do NOT call before 10am", "Key contact: Zoë O'Neil", "Migrated from old CRM; verify data",
    "Budget ≈ €250k", "Uses <script> tags in their notes field, sanitise!",
]


def _fmt_phone(rng, pattern):
    out = pattern
    while "{d4}" in out or "{d3}" in out or "{d2}" in out:
        for tok, n in (("{d4}", 4), ("{d3}", 3), ("{d2}", 2)):
            if tok in out:
                out = out.replace(tok, "".join(str(rng.randrange(10)) for _ in range(n)), 1)
    return out


def _rand_uuid(rng):
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


ANCHOR_MS = int(datetime(2025, 6, 1, tzinfo=timezone.utc).timestamp() * 1000)


def random_company_fields(rng, i, owners, existing_domains=None):
    """Realistic writable fields for company number i."""
    r = rng.random()
    if r < 0.70:
        stem = rng.choice(NAME_STEMS)
    elif r < 0.88:
        stem = rng.choice(ACCENTED)
    else:
        stem = rng.choice(QUOTED)
    name = " ".join(x for x in (stem, rng.choice(QUALIFIERS), rng.choice(SUFFIXES)) if x)

    base = "%s-%d" % (rng.choice(SLUGS), 100 + i)
    d = base + rng.choice(TLDS)
    website = None
    domain = None
    r = rng.random()
    if r < 0.08:
        website = rng.choice([None, None, ""])
        domain = None
    else:
        w = rng.random()
        if w < 0.45:
            website = "https://www." + d
        elif w < 0.75:
            website = d
        elif w < 0.87:
            website = "https://" + d + "/"
        elif w < 0.95:
            website = "http://www." + d
        else:
            website = "https://www." + d + "/en/home"
        k = rng.random()
        if existing_domains and k < 0.03:
            dup = rng.choice(existing_domains)
            domain = dup if rng.random() < 0.6 else dup.upper() if rng.random() < 0.5 else dup.capitalize()
            website = rng.choice(["https://www." + domain.lower(), domain.lower()])
        elif k < 0.08:
            domain = None
        elif k < 0.12:
            domain = d.capitalize()
        elif k < 0.14:
            domain = "www." + d
        else:
            domain = d

    loc = rng.choice(LOCATIONS)
    has_addr = rng.random() > 0.10
    city = loc[0] if has_addr else None
    state = loc[1] if has_addr else None
    country = (loc[3] if rng.random() < 0.12 else loc[2]) if has_addr else None
    postal = loc[4] if has_addr and rng.random() > 0.05 else (None if not has_addr else "")
    address = loc[5].format(n=rng.randint(1, 999)) if has_addr else None

    pr = rng.random()
    phone = None if pr < 0.15 else "" if pr < 0.18 else _fmt_phone(rng, loc[6])

    rv = rng.random()
    if rv < 0.20:
        revenue = None
    elif rv < 0.60:
        revenue = Decimal(rng.randrange(1, 900) * 100000)
    elif rv < 0.95:
        revenue = Decimal(rng.randrange(10**5, 10**11)).scaleb(-2)
    else:
        revenue = Decimal(rng.randrange(10**16, 10**19)).scaleb(-2)

    ec = rng.random()
    if ec < 0.15:
        employees = None
    elif ec < 0.45:
        employees = rng.randint(1, 50)
    elif ec < 0.85:
        employees = rng.randint(51, 5000)
    else:
        employees = rng.randint(5001, 250000)

    ir = rng.random()
    industry = None if ir < 0.10 else "" if ir < 0.13 else rng.choice(INDUSTRIES)
    dr = rng.random()
    description = None if dr < 0.30 else "" if dr < 0.35 else rng.choice(DESCRIPTIONS)
    nr = rng.random()
    notes = None if nr < 0.60 else "" if nr < 0.68 else rng.choice(NOTES)
    lr = rng.random()
    linkedin = None
    if lr < 0.5:
        linkedin = "https://linkedin.com/company/" + base
    elif lr < 0.6:
        linkedin = "https://www.linkedin.com/company/" + base + "/"
    tags = rng.sample(TAGS, rng.choice([0, 0, 1, 1, 2, 3]))
    owner = rng.choice(owners) if rng.random() < 0.8 else None

    return {
        "name": name, "domain": domain, "industry": industry, "description": description,
        "employeeCount": employees, "annualRevenue": revenue, "phone": phone,
        "website": website, "linkedInUrl": linkedin, "address": address, "city": city,
        "state": state, "country": country, "postalCode": postal, "tags": tags,
        "notes": notes, "ownerId": owner,
    }


def seed_store(n, seed):
    rng = random.Random(seed)
    tenant = _rand_uuid(rng)
    owners = [_rand_uuid(rng) for _ in range(6)]
    store = Store(tenant)
    names = []
    domains = []
    group = set()
    if n >= 40:
        g = min(150, max(30, n // 8))
        group = set(rng.sample(range(n), g))
    import_ts = ANCHOR_MS - 30 * 86400 * 1000  # whole second, .000
    for i in range(n):
        cid = _rand_uuid(rng)
        fields = random_company_fields(rng, i, owners, domains)
        if names and rng.random() < 0.05:
            fields["name"] = rng.choice(names)
        names.append(fields["name"])
        if fields["domain"]:
            domains.append(fields["domain"])
        if i in group:
            created = updated = import_ts
        else:
            created = ANCHOR_MS - rng.randrange(1, 730 * 86400 * 1000)
            if rng.random() < 0.2:
                created -= created % 1000
            if rng.random() < 0.3:
                updated = created
            else:
                updated = created + rng.randrange(0, ANCHOR_MS - created)
                if rng.random() < 0.2:
                    updated -= updated % 1000
                    updated = max(updated, created)
        store.insert(fields, cid=cid, created=created, updated=updated)
    # guarantee ~3 % duplicate domains (at least one when n >= 20)
    want = max(1, n * 3 // 100) if n >= 20 else 0
    have = sum(len(v) - 1 for v in store.domain_idx.values() if len(v) > 1)
    if have < want:
        ids = [c["id"] for c in sorted(store.by_id.values(), key=lambda c: c["id"])]
        with_dom = [i for i in ids if store.by_id[i]["domain"]]
        for j in range(want - have):
            src = store.by_id[rng.choice(with_dom)]
            dst = store.by_id[rng.choice(ids)]
            if dst["id"] == src["id"]:
                continue
            dom = src["domain"] if j % 2 == 0 else src["domain"].upper()
            store._idx_del(dst)
            dst["domain"] = dom
            dst["website"] = "https://www." + dom.lower()
            store._idx_add(dst)
    store._dirty()
    store.writes.clear()
    return store


# --------------------------------------------------------------------------------------------
# Server state: stats, rate limiter, faults
# --------------------------------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.accepted = 0
        self.rate_limited = 0
        self.unauthorized = 0
        self.faults_injected = 0
        self.faults_by_kind = collections.Counter()
        self.status_counts = collections.Counter()
        self.mutations = 0
        self._arrivals = collections.deque()
        self._accepts = collections.deque()
        self.max_window = 0
        self.max_accepted_window = 0

    @staticmethod
    def _slide(dq, t):
        dq.append(t)
        while dq and t - dq[0] >= 1.0:
            dq.popleft()
        return len(dq)

    def arrival(self):
        t = time.monotonic()
        with self.lock:
            self.requests += 1
            self.max_window = max(self.max_window, self._slide(self._arrivals, t))

    def accept(self):
        t = time.monotonic()
        with self.lock:
            self.accepted += 1
            self.max_accepted_window = max(self.max_accepted_window, self._slide(self._accepts, t))


class RateLimiter:
    def __init__(self, rps):
        self.allow = int(rps) if rps > 0 else 0
        if rps > 0 and self.allow < 1:
            self.allow = 1
        self.lock = threading.Lock()
        self.window = None
        self.count = 0

    def try_acquire(self):
        if self.allow <= 0:
            return True
        w = int(time.time())
        with self.lock:
            if w != self.window:
                self.window = w
                self.count = 0
            if self.count >= self.allow:
                return False
            self.count += 1
            return True


class Faults:
    def __init__(self, seed):
        self.lock = threading.Lock()
        self.rate = 0.0
        self.kinds = list(FAULT_KINDS)
        self.rng = random.Random(seed * 7919 + 17)

    def pick(self):
        with self.lock:
            if self.rate <= 0 or not self.kinds:
                return None
            if self.rng.random() < self.rate:
                return self.rng.choice(self.kinds)
            return None


HTML_500 = (b"<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head>"
            b"<body><h1>Internal Server Error</h1><p>An unexpected error occurred. "
            b"Request ID: 0HMVD8K2J3Q1A:00000001</p></body></html>")
HTML_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
            b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
            b"</body>\r\n</html>\r\n")


# --------------------------------------------------------------------------------------------
# API operations (return (status, body_bytes, headers))
# --------------------------------------------------------------------------------------------

class Api:
    def __init__(self, store):
        self.store = store

    # list ------------------------------------------------------------------------------------
    def list(self, query):
        params = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            params.setdefault(k.lower(), v)
        limit = 25
        if params.get("limit", "") != "":
            try:
                limit = int(params["limit"])
            except ValueError:
                raise ApiError(400, "validation_error", "limit must be an integer")
            if limit > 100:
                raise ApiError(400, "validation_error", "limit must not exceed 100")
            if limit < 1:
                raise ApiError(400, "validation_error", "limit must be at least 1")
        offset = 0
        if params.get("offset", "") != "":
            try:
                offset = int(params["offset"])
            except ValueError:
                raise ApiError(400, "validation_error", "offset must be an integer")
            if offset < 0:
                raise ApiError(400, "validation_error", "offset must not be negative")
        since_us = None
        if params.get("updatedsince", "") != "":
            try:
                since_us = parse_iso_us(params["updatedsince"])
            except (ValueError, OverflowError):
                raise ApiError(400, "validation_error",
                               "updatedSince is not a valid ISO-8601 date-time: %r"
                               % params["updatedsince"])
        fields = None
        if params.get("fields", "").strip():
            fields = {"id"}
            for name in params["fields"].split(","):
                name = name.strip()
                if not name:
                    continue
                f = FIELD_BY_LOWER.get(name.lower())
                if not f:
                    raise ApiError(400, "validation_error", "Unknown field in fields: %s" % name)
                fields.add(f)
        lst, keys = self.store.sorted_list()
        start = 0
        if since_us is not None:
            start = bisect.bisect_right(keys, since_us)
        page = lst[start + offset:start + offset + limit]
        return 200, enc_bytes([api_form(c, fields) for c in page]), []

    # get -------------------------------------------------------------------------------------
    def get(self, cid):
        c = self.store.get(cid)
        if c is None:
            raise ApiError(404, "not_found", "Company %s not found" % cid)
        with self.store.lock:
            return 200, enc_bytes(api_form(c)), []

    # create ----------------------------------------------------------------------------------
    def create(self, body):
        fields = validate_full(body)
        with self.store.lock:
            if fields["domain"] and self.store.find_by_domain(fields["domain"]):
                other = self.store.find_by_domain(fields["domain"])[0]
                raise ApiError(409, "conflict", "A company with domain '%s' already exists (id %s)"
                               % (fields["domain"], other["id"]))
            c = self.store.insert(fields)
            return 201, enc_bytes(api_form(c)), [("Location", "/api/v1/companies/" + c["id"])]

    # update ----------------------------------------------------------------------------------
    def update(self, cid, body):
        with self.store.lock:
            c = self.store.get(cid)
            if c is None:
                raise ApiError(404, "not_found", "Company %s not found" % cid)
            fields = validate_full(body)
            newk = dom_key(fields["domain"])
            if newk and newk != dom_key(c["domain"]):
                others = [o for o in self.store.find_by_domain(fields["domain"]) if o["id"] != cid]
                if others:
                    raise ApiError(409, "conflict",
                                   "Domain '%s' is already used by company %s"
                                   % (fields["domain"], others[0]["id"]))
            c, _ = self.store.update(cid, fields)
            return 200, enc_bytes(api_form(c)), []

    # upsert ----------------------------------------------------------------------------------
    def _upsert_one(self, fields):
        """Returns ("created"|"updated", id). Caller holds the lock."""
        matches = self.store.find_by_domain(fields["domain"])
        if matches:
            c, _ = self.store.update(matches[0]["id"], fields)
            return "updated", c["id"]
        c = self.store.insert(fields)
        return "created", c["id"]

    def upsert(self, body):
        fields = validate_full(body)
        if not dom_key(fields["domain"]):
            raise ApiError(400, "validation_error", "Domain is required for upsert")
        with self.store.lock:
            action, cid = self._upsert_one(fields)
        return (201 if action == "created" else 200), enc_bytes({"action": action, "id": cid}), []

    # delete ----------------------------------------------------------------------------------
    def delete(self, cid):
        if not self.store.delete(cid):
            raise ApiError(404, "not_found", "Company %s not found" % cid)
        return 204, b"", []

    # bulk ------------------------------------------------------------------------------------
    def bulk(self, body):
        if not isinstance(body, list):
            raise ApiError(400, "validation_error", "Request body must be a JSON array of companies")
        if len(body) > 100:
            raise ApiError(400, "too_many_records",
                           "Bulk requests are limited to 100 records (got %d)" % len(body))
        created, updated, failed = 0, 0, 0
        created_ids, errors = [], []
        with self.store.lock:
            for idx, rec in enumerate(body):
                try:
                    fields = validate_full(rec)
                except ApiError as e:
                    failed += 1
                    errors.append({"index": idx, "error": e.message})
                    continue
                if dom_key(fields["domain"]):
                    action, cid = self._upsert_one(fields)
                else:
                    action, cid = "created", self.store.insert(fields)["id"]
                if action == "created":
                    created += 1
                    created_ids.append(cid)
                else:
                    updated += 1
        out = {"created": created, "updated": updated, "failed": failed,
               "createdIds": created_ids, "errors": errors}
        return (207 if failed else 200), enc_bytes(out), []


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                     r"[0-9a-fA-F]{12}$|^\{[0-9a-fA-F-]{36}\}$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Kestrel"
    sys_version = ""
    wbufsize = 65536               # headers + body leave in one send
    disable_nagle_algorithm = True

    # set by main()
    api = None
    store = None
    stats = None
    limiter = None
    faults = None
    api_key = None

    def version_string(self):
        return "Kestrel"

    def log_message(self, fmt, *args):  # silence default logging
        pass

    def log_request(self, code="-", size="-"):
        pass

    def _log(self, status):
        try:
            sys.stderr.write("%s %s %s\n" % (self.command, self.path, status))
            sys.stderr.flush()
        except Exception:
            pass

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_OPTIONS(self):
        self._dispatch()

    # -- low level ------------------------------------------------------------------------------
    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers
                        t = self.rfile.readline(65537)
                        if not t or t in (b"\r\n", b"\n"):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, status, body=b"", ctype="application/json; charset=utf-8", headers=()):
        self.send_response(status)
        if status != 204 or body:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
        with self.stats.lock:
            self.stats.status_counts[status] += 1
        self._log(status)

    def _send_error(self, e):
        self._send(e.status, err_body(e.code, e.message), headers=e.headers)

    # -- dispatch -------------------------------------------------------------------------------
    def _dispatch(self):
        try:
            raw = self._read_body()
        except Exception:
            self.close_connection = True
            self._log("BADBODY")
            return
        parts = urlsplit(self.path)
        path = parts.path
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        try:
            if path.startswith("/__admin"):
                self._admin(path, raw)
            else:
                self._api(path, parts.query, raw)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except ApiError as e:
            self._send_error(e)
        except Exception as e:  # pragma: no cover
            traceback.print_exc()
            try:
                self._send(500, err_body("internal_error", "Unhandled error: %s" % e))
            except Exception:
                self.close_connection = True

    # -- API ------------------------------------------------------------------------------------
    def _route(self, path, query, raw):
        """Returns a callable that performs the operation (so faults can decide first)."""
        lp = path.lower()
        m = self.command
        api = self.api

        def body():
            ctype = (self.headers.get("Content-Type") or "").lower()
            if raw and "json" not in ctype:
                raise ApiError(415, "unsupported_media_type",
                               "Content-Type must be application/json")
            if not raw.strip():
                raise ApiError(400, "validation_error", "A request body is required")
            return parse_json(raw)

        if lp == "/api/v1/companies":
            if m in ("GET", "HEAD"):
                return lambda: api.list(query)
            if m == "POST":
                return lambda: api.create(body())
            raise ApiError(405, "method_not_allowed", "Method %s not allowed" % m,
                           [("Allow", "GET, POST")])
        if lp == "/api/v1/companies/upsert":
            if m == "PUT":
                return lambda: api.upsert(body())
            raise ApiError(405, "method_not_allowed", "Method %s not allowed" % m,
                           [("Allow", "PUT")])
        if lp == "/api/v1/companies/bulk":
            if m == "POST":
                return lambda: api.bulk(body())
            raise ApiError(405, "method_not_allowed", "Method %s not allowed" % m,
                           [("Allow", "POST")])
        if lp.startswith("/api/v1/companies/"):
            seg = path[len("/api/v1/companies/"):]
            if "/" not in seg and UUID_RE.match(seg):
                cid = str(uuid.UUID(seg.strip("{}")))
                if m in ("GET", "HEAD"):
                    return lambda: api.get(cid)
                if m == "PUT":
                    return lambda: api.update(cid, body())
                if m == "DELETE":
                    return lambda: api.delete(cid)
                raise ApiError(405, "method_not_allowed", "Method %s not allowed" % m,
                               [("Allow", "GET, PUT, DELETE")])
        raise ApiError(404, "not_found", "No route for %s %s" % (m, path))

    def _api(self, path, query, raw):
        self.stats.arrival()
        key = self.headers.get("X-Api-Key")
        if key is None or key != self.api_key:
            with self.stats.lock:
                self.stats.unauthorized += 1
            raise ApiError(401, "unauthorized",
                           "Missing or invalid API key (X-Api-Key header)")
        if not self.limiter.try_acquire():
            with self.stats.lock:
                self.stats.rate_limited += 1
            raise ApiError(429, "rate_limited",
                           "Rate limit exceeded: %d requests per second" % self.limiter.allow,
                           [("Retry-After", "1")])
        self.stats.accept()
        kind = self.faults.pick()
        if kind:
            with self.stats.lock:
                self.stats.faults_injected += 1
                self.stats.faults_by_kind[kind] += 1
        if kind == "500":
            self._send(500, HTML_500, "text/html; charset=utf-8")
            return
        if kind == "502":
            self._send(502, HTML_502, "text/html")
            return
        if kind == "429":
            self._send(429, err_body("rate_limited", "Too many requests, slow down"),
                       headers=[("Retry-After", "2")])
            return
        try:
            op = self._route(path, query, raw)
            status, body, headers = op()
        except ApiError as e:
            status, body, headers = e.status, err_body(e.code, e.message), e.headers
        if kind == "slow":
            time.sleep(3)
        elif kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._log("DROP")
            return
        elif kind == "malformed":
            if not body:
                body = enc_bytes({"deleted": True, "status": status})
            cut = body[:max(1, len(body) // 2)]
            self._send(200, cut)
            return
        self._send(status, body, headers=headers)

    # -- admin ----------------------------------------------------------------------------------
    def _admin(self, path, raw):
        lp = path.lower()
        m = self.command
        if lp == "/__admin/companies" and m == "GET":
            lst, _ = self.store.sorted_list()
            self._send(200, enc_bytes([api_form(c) for c in lst]))
            return
        if lp == "/__admin/stats" and m == "GET":
            s = self.stats
            with s.lock:
                out = {
                    "requests": s.requests,
                    "accepted": s.accepted,
                    "rate_limited": s.rate_limited,
                    "unauthorized": s.unauthorized,
                    "max_requests_in_any_1s_window": s.max_window,
                    "max_accepted_in_any_1s_window": s.max_accepted_window,
                    "faults_injected": s.faults_injected,
                    "faults_by_kind": dict(s.faults_by_kind),
                    "status_counts": {str(k): v for k, v in sorted(s.status_counts.items())},
                    "mutations": s.mutations,
                }
            with self.store.lock:
                out["companies"] = len(self.store.by_id)
                out["writes"] = dict(self.store.writes)
            out["rps"] = self.limiter.allow
            with self.faults.lock:
                out["fault_rate"] = self.faults.rate
                out["fault_kinds"] = list(self.faults.kinds)
            self._send(200, enc_bytes(out))
            return
        if lp == "/__admin/faults":
            if m == "POST":
                cfg = parse_json(raw) if raw.strip() else {}
                if not isinstance(cfg, dict):
                    raise ApiError(400, "validation_error", "body must be an object")
                try:
                    rate = float(cfg.get("rate", 0) or 0)
                except (TypeError, ValueError):
                    raise ApiError(400, "validation_error", "rate must be a number")
                kinds = cfg.get("kinds")
                if kinds is None or kinds == []:
                    kinds = list(FAULT_KINDS)
                else:
                    if not isinstance(kinds, list):
                        raise ApiError(400, "validation_error", "kinds must be an array")
                    kinds = [str(k).lower() for k in kinds]
                    bad = [k for k in kinds if k not in FAULT_KINDS]
                    if bad:
                        raise ApiError(400, "validation_error",
                                       "unknown fault kinds %s (known: %s)" % (bad, FAULT_KINDS))
                with self.faults.lock:
                    self.faults.rate = max(0.0, min(1.0, rate))
                    self.faults.kinds = kinds
            elif m != "GET":
                raise ApiError(405, "method_not_allowed", "GET or POST")
            with self.faults.lock:
                out = {"rate": self.faults.rate, "kinds": list(self.faults.kinds)}
            self._send(200, enc_bytes(out))
            return
        if lp == "/__admin/mutate" and m == "POST":
            req = parse_json(raw) if raw.strip() else {}
            if not isinstance(req, dict) or not isinstance(req.get("fields", {}), dict):
                raise ApiError(400, "validation_error", 'body must be {"id"?, "fields": {...}}')
            c = admin_mutate(self.store, req.get("id"), req.get("fields") or {})
            with self.store.lock:
                self._send(200, enc_bytes(api_form(c)))
            return
        raise ApiError(404, "not_found", "No admin route %s %s" % (m, path))


def admin_mutate(store, cid, given):
    fields = {}
    created = updated = None
    for k, v in given.items():
        lk = str(k).lower()
        if lk in ("createdat", "updatedat"):
            if not isinstance(v, str):
                raise ApiError(400, "validation_error", "%s must be an ISO-8601 string" % k)
            try:
                ms = parse_iso_us(v) // 1000
            except ValueError:
                raise ApiError(400, "validation_error", "%s is not ISO-8601" % k)
            if lk == "createdat":
                created = ms
            else:
                updated = ms
            continue
        f = WRITABLE_BY_LOWER.get(lk)
        if not f:
            raise ApiError(400, "validation_error", "unknown or read-only field %s" % k)
        fields[f] = coerce_field(f, v, lenient=True)
    if "name" in fields and (fields["name"] is None or not fields["name"].strip()):
        raise ApiError(400, "validation_error", "name cannot be cleared")
    with store.lock:
        if cid is None:
            if not fields.get("name"):
                raise ApiError(400, "validation_error", "name is required to create")
            c = store.insert(fields, created=created, updated=updated)
            if updated is None and created is not None:
                c["updatedAt"] = created
            return c
        cid = str(cid)
        try:
            cid = str(uuid.UUID(cid))
        except ValueError:
            pass
        if store.get(cid) is None:
            raise ApiError(404, "not_found", "Company %s not found" % cid)
        c, _ = store.update(cid, fields, force_bump=True, created=created, updated=updated)
        return c


# --------------------------------------------------------------------------------------------
# Mutator
# --------------------------------------------------------------------------------------------

def mutator_loop(store, stats, rate, seed):
    rng = random.Random(seed * 31 + 5)
    owners = [_rand_uuid(random.Random(seed + 99)) for _ in range(3)]
    interval = 1.0 / rate
    n = 0
    next_t = time.monotonic()
    while True:
        next_t += interval
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.monotonic()
        n += 1
        try:
            with store.lock:
                ids = list(store.by_id.keys())
                if not ids or rng.random() < 0.15:
                    fields = random_company_fields(rng, 100000 + n, owners)
                    if fields["domain"] and store.find_by_domain(fields["domain"]):
                        fields["domain"] = None
                    store.insert(fields)
                else:
                    cid = rng.choice(ids)
                    c = store.by_id[cid]
                    fresh = random_company_fields(rng, 100000 + n, owners)
                    choices = ["name", "city", "phone", "employeeCount", "annualRevenue",
                               "tags", "notes", "description", "industry", "postalCode"]
                    change = {}
                    for f in rng.sample(choices, rng.randint(1, 3)):
                        v = fresh[f]
                        if f == "name":
                            v = c["name"] + rng.choice([" Inc.", " (Europe)", " — Holding", "!"])
                        elif f == "employeeCount":
                            v = (c[f] or 10) + rng.randint(1, 50)
                        elif f == "notes":
                            v = rng.choice([None, "Updated by %s at %d" % (
                                rng.choice(["Zoë", "José", "O'Neil"]), n)])
                        if values_equal(c[f], v) and f != "name":
                            v = "%s %d" % (f, n) if f in STRING_FIELDS else v
                        change[f] = v
                    store.update(cid, change, force_bump=True)
            with stats.lock:
                stats.mutations += 1
        except Exception:
            traceback.print_exc()


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="Rally CRM Companies API mock (variant)")
    ap.add_argument("--port", type=int, default=9701)
    ap.add_argument("--api-key", default="rk_test")
    ap.add_argument("--companies", type=int, default=100)
    ap.add_argument("--rps", type=float, default=10)
    ap.add_argument("--mutations-per-second", type=float, default=0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    store = seed_store(max(0, args.companies), args.seed)
    Handler.api = Api(store)
    Handler.store = store
    Handler.stats = Stats()
    Handler.limiter = RateLimiter(args.rps)
    Handler.faults = Faults(args.seed)
    Handler.api_key = args.api_key

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.mutations_per_second > 0:
        t = threading.Thread(target=mutator_loop,
                             args=(store, Handler.stats, args.mutations_per_second, args.seed),
                             daemon=True)
        t.start()
    sys.stderr.write("rally mock listening on 127.0.0.1:%d (%d companies, rps %s, seed %d)\n"
                     % (args.port, store.count(), args.rps, args.seed))
    sys.stderr.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
