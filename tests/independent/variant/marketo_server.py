#!/usr/bin/env python3
"""Independent mock of the Marketo REST Companies API (+ identity), "variant" flavour.

Written only from /work/shared/api/{README.md, pitfalls.md, marketo-companies.txt,
marketo-notes.md, spec/*.json} and general knowledge of Marketo.  Standard library only.

Start:
  python3 marketo_server.py --port 9702 --client-id mid --client-secret msecret \
      --companies N --first-id 1 --token-ttl 3600 --mutations-per-second 0 --seed 2
Optional extra flag: --daily-quota Q (default 50000).

REST base: http://127.0.0.1:PORT/rest      identity: GET/POST /identity/oauth/token

Behaviour (numbered spec of every choice made)
==============================================
Transport
 1. Binds 127.0.0.1 only; ThreadingHTTPServer; HTTP/1.1 keep-alive; every answer carries
    Content-Length.  Request bodies are read by Content-Length (chunked is also accepted).
 2. Every REST and identity request sleeps ~10 ms (inside the concurrency slot for REST) so
    concurrent clients overlap.  Admin requests do not sleep.
 3. One line per request on stderr: time, method, path+query (cut at 300 chars), HTTP
    status / Marketo code (or fault label).

Identity
 4. GET or POST /identity/oauth/token; parameters from the query string and/or a
    form-encoded (or JSON) body: grant_type=client_credentials, client_id, client_secret.
    Success: HTTP 200 {"access_token": "<uuid>:ab", "token_type": "bearer",
    "expires_in": --token-ttl, "scope": "<client-id>@api.example.com"}.
 5. EVERY identity call mints a NEW token (expires_in always the full TTL); older tokens stay
    valid until their own expiry.  Identity calls are not rate limited, not counted in quota,
    never faulted.
 6. Identity errors are real HTTP errors with an OAuth body: missing grant_type → 400
    {"error":"invalid_request"}; other grant_type → 400 {"error":"unsupported_grant_type"};
    wrong/missing client id/secret → 401 {"error":"unauthorized","error_description":
    "Bad client credentials"}.

REST envelope / auth
 7. All REST answers are HTTP 200 JSON {"requestId": "xxxx#hexms", "success": bool,
    "result": [...] | "errors": [{"code": "NNN", "message": "..."}], "nextPageToken"?,
    "moreResult"?}.  Codes are strings.  "warnings" appears only when non-empty (never here).
    Exceptions: the injected "500" fault (HTML, HTTP 500) and unknown non-REST paths (404).
 8. Token from "Authorization: Bearer <t>" (scheme case-insensitive) or the deprecated
    access_token query/form parameter.  None → 600 "Access token not specified"; unknown →
    601 "Access token invalid"; past its expiry → 602 "Access token expired".  Auth failures
    do not count toward the rate window, concurrency or quota.
 9. Unknown /rest path → 610 "Requested resource not found"; wrong HTTP method on a known
    path → 605 "Request method 'X' not supported".  URI longer than 8 KB → 414; body larger
    than 1 MB → 413 (both as HTTP 200 JSON errors).  Sync/delete bodies must have a JSON
    Content-Type (else 612 "Invalid Content Type") and parse as a JSON object (else 609
    "Invalid JSON").

Limits (checked in this order after auth)
10. Every call that passed auth is recorded in a 20 s SLIDING window — including calls that
    are then rejected with 606/607/615 — so a client that keeps calling while limited stays
    limited.  If the window already held >= 100 calls → 606 "Max rate limit '100' exceeded
    with in '20' secs".
11. Daily quota 50000 (--daily-quota) → 607 "Daily quota reached"; resets at midnight
    America/Chicago.  quota_used counts every authenticated call not answered 607
    (606/615/faulted calls do consume quota).
12. More than 10 REST calls in flight → 615 "Concurrent access limit reached".
13. Order: auth → window record + 606 → 607 → 615 → fault injection → endpoint.
14. Stats (GET /__admin/stats): requests (all non-admin requests incl. identity),
    rest_calls, identity_calls, auth_errors, rate_limited (606 by the limiter),
    conc_limited (615), quota_limited (607), max_calls_in_any_20s_window (max size of the
    limiter window, i.e. counting rejected calls too), max_served_calls_in_any_20s_window
    (same but only calls not rejected by 606/607/615), quota_used, max_in_flight,
    tokens_issued, faults_injected, faults_by_kind, codes (count per Marketo code).

Faults (POST /__admin/faults {"rate": r, "kinds": [...]}; default kinds = all)
15. A fraction r of REST calls that passed auth and the limits get one fault:
    "500" HTML page with HTTP 500 (not applied); "604" HTTP 200 error 604 "Request timed
    out" (not applied); "606" rate-limit error even though under the limit (not applied);
    "602" "Access token expired" although the token is still valid (not applied);
    "drop" the request is APPLIED then the connection is closed without an answer;
    "malformed" APPLIED, then HTTP 200 with a truncated JSON body (Content-Length matches
    the truncated body); "slow" applied and answered normally after 3 s.

Data
16. Fields: id (integer), externalCompanyId (string ≤100, unique, dedupe key), company,
    website (url), mainPhone (phone), industry, annualRevenue (currency), numberOfEmployees
    (integer), billingStreet, billingCity, billingState, billingCountry, billingPostalCode,
    sicCode (strings ≤255), createdAt, updatedAt (read-only, "YYYY-MM-DDTHH:MM:SSZ", second
    precision, UTC).
17. updatedAt is bumped on every write (sync update — even when no value changed —, admin
    mutate, background mutator) to max(now, previous updatedAt + 1 s), so every write makes
    updatedAt strictly increase.  Ids are never reused (next id = highest id ever + 1).
18. Seed data is deterministic from --seed: names with accents/quotes/apostrophes, ~6 %
    duplicated names, ~3 % duplicated websites, ~13 % without website, websites like
    "https://www.example-123.com" or "example-123.com", random empty (null) fields, a few
    almost-empty rows, ~10 % with an externalCompanyId.  Seed timestamps lie in 2019–2024.

Describe / schema
19. GET /rest/v1/companies/describe.json → one object: name "Company", idField "id",
    dedupeFields ["externalCompanyId"], searchableFields [["externalCompanyId"],["id"],
    ["company"]], fields [{name, displayName, dataType, length?, updateable}].
    GET /rest/v1/companies/schema/fields.json (batchSize/nextPageToken, moreResult) and
    /rest/v1/companies/schema/fields/{name}.json (unknown → 1006) are also served, as is
    GET /rest/v1/stats/usage.json.

Query (GET /rest/v1/companies.json, or POST ...companies.json?_method=GET with a
form-encoded body; body params override query params)
20. filterType must be externalCompanyId, id or company ("dedupeFields" is an alias of
    externalCompanyId, "idField" of id); missing → 701, other → 1003 "Invalid filterType".
    filterValues comma-separated (the parameter may also repeat), values trimmed, empties
    dropped, duplicates ignored; missing/empty → 701; > 300 values → 1003; filterType=id with
    a non-integer value → 1003.  externalCompanyId matches exactly (case-sensitive),
    company matches case-insensitively (exact string otherwise).
21. Results come in ascending ID order (NOT filterValues order), each with "seq" (0-based
    position in the page) and "id" always, plus exactly the requested fields; null values
    are JSON null, never omitted.  Without fields: id, externalCompanyId, createdAt,
    updatedAt.  Unknown requested field → whole-call error 1006 "Field 'x' not found".
22. batchSize default 300; non-integer, < 1 or > 300 → 1003.
23. nextPageToken is opaque (base32 with "=" padding, HMAC-signed) and encodes only an offset
    and its issue time.  It is valid 60 s after issue, then → 1003 "Invalid nextPageToken"
    (also for garbage).  The offset is applied to the LIVE matching id list at the time of
    the next call (no snapshot): creates/deletes during paging shift later pages.  A token
    used with different filter values is simply applied to the new filter.
24. A nextPageToken (and moreResult true) is given only when rows remain after this page;
    the last page has moreResult false and no token.  An offset past the end → empty result.

Sync (POST /rest/v1/companies.json or /rest/v1/companies/sync.json, JSON body)
25. action createOnly|updateOnly|createOrUpdate (default createOrUpdate), dedupeBy
    dedupeFields|idField (default dedupeFields); other values → 1003; idField with
    createOnly → 1003 (whole call).  input required (missing/not an array → 701, empty →
    701), at most 300 records (→ 1003 "Batch size exceeded the max of 300").
26. Per-record results in input order: {"seq", "status": "created"|"updated", "id"} or
    {"seq", "status": "skipped", "reasons": [{"code", "message"}]} (skipped rows carry no
    id).  Checks per record, first failure wins:
      a. not an object → 1003;
      b. unknown field → 1006 "Field 'x' not found"; createdAt/updatedAt → 1003 not
         updateable;
      c. dedupeFields: "id" present → 1003; externalCompanyId missing/null/"" → 1003;
         idField: id missing or not an integer → 1003;
      d. field values: numberOfEmployees must be an integer (JSON int, integral float or an
         integer string, 32-bit); annualRevenue a number or numeric string, finite and
         |x| ≤ 1e15; strings (numbers are stringified) ≤ 255 chars, externalCompanyId ≤ 100;
         bool/array/object for a scalar → 1003.  null or "" writes null;
      e. same key twice in one batch → later ones skipped 1036 "Duplicate value in input";
      f. createOnly and key exists → 1005 "Company already exists";
         updateOnly / idField and key absent → 1013 "Record not found";
      g. idField: externalCompanyId differing from the stored one → 1003 (cannot change).
27. Updates touch only the fields given; creates get createdAt = updatedAt = now.

Delete (POST /rest/v1/companies/delete.json)
28. deleteBy dedupeFields|idField (default dedupeFields), input ≤ 300.  Per record:
    {"seq", "id", "status": "deleted"} or skipped with 1003 (key missing/invalid) or 1013
    "Record not found".  Other fields in a record are ignored.

Admin (never authenticated, rate limited, faulted or delayed)
29. GET /__admin/companies → JSON array of all companies (all fields, id order).
    GET /__admin/stats → stats object (item 14).
    POST /__admin/mutate {"id": ID, "fields": {...}} updates (null clears; same validation
    as sync, externalCompanyId may be changed but must stay unique) and bumps updatedAt;
    {"fields": {...}} creates; {"id": ID, "delete": true} deletes.  Returns the company JSON
    (or {"id", "deleted": true}); 400 on invalid input, 404 unknown id, 409 duplicate
    externalCompanyId.
    POST /__admin/faults {"rate": r, "kinds": [...]} → current fault config.
30. --mutations-per-second R > 0 starts a thread that, R times a second, edits one or two
    fields of a random company (70 %), clears a field (10 %) or creates a company (20 %),
    through the same store code path as the API (timestamps bump).
"""

import argparse
import base64
import hashlib
import hmac
import json
import math
import os
import random
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

try:
    from zoneinfo import ZoneInfo
    CHICAGO = ZoneInfo("America/Chicago")
except Exception:  # pragma: no cover
    CHICAGO = timezone(timedelta(hours=-6))

# --------------------------------------------------------------------------- fields

# name, displayName, dataType, length, updateable
FIELD_DEFS = [
    ("id", "Id", "integer", None, False),
    ("externalCompanyId", "External Company Id", "string", 100, False),
    ("company", "Company Name", "string", 255, True),
    ("website", "Website", "url", 255, True),
    ("mainPhone", "Main Phone", "phone", 255, True),
    ("industry", "Industry", "string", 255, True),
    ("annualRevenue", "Annual Revenue", "currency", None, True),
    ("numberOfEmployees", "Number of Employees", "integer", None, True),
    ("billingStreet", "Billing Address", "string", 255, True),
    ("billingCity", "Billing City", "string", 255, True),
    ("billingState", "Billing State", "string", 255, True),
    ("billingCountry", "Billing Country", "string", 255, True),
    ("billingPostalCode", "Billing Postal Code", "string", 255, True),
    ("sicCode", "SIC Code", "string", 255, True),
    ("createdAt", "Created At", "datetime", None, False),
    ("updatedAt", "Updated At", "datetime", None, False),
]
FIELD_NAMES = [f[0] for f in FIELD_DEFS]
FIELD_SET = set(FIELD_NAMES)
FIELD_BY_NAME = {f[0]: f for f in FIELD_DEFS}
WRITABLE = [f[0] for f in FIELD_DEFS if f[0] not in ("id", "createdAt", "updatedAt")]
DEFAULT_QUERY_FIELDS = ["id", "externalCompanyId", "createdAt", "updatedAt"]
FILTER_TYPES = {"externalCompanyId": "externalCompanyId", "dedupeFields": "externalCompanyId",
                "id": "id", "idField": "id", "company": "company"}
MAX_BATCH = 300
TOKEN_VALIDITY = 60.0
RATE_LIMIT = 100
RATE_WINDOW = 20.0
MAX_CONCURRENT = 10
MAX_BODY = 1024 * 1024
MAX_URI = 8192
FAULT_KINDS = ["500", "604", "606", "602", "drop", "malformed", "slow"]


def fmt_ts(epoch_s):
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Invalid(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def coerce_value(field, value):
    """Validate/convert one input value.  Returns the stored value or raises Invalid."""
    if value is None:
        return None
    if isinstance(value, str) and value == "":
        return None
    if field == "numberOfEmployees":
        v = None
        if isinstance(value, bool):
            v = None
        elif isinstance(value, int):
            v = value
        elif isinstance(value, float) and math.isfinite(value) and value == int(value):
            v = int(value)
        elif isinstance(value, str):
            s = value.strip()
            try:
                v = int(s, 10)
            except ValueError:
                v = None
        if v is None or not (-2 ** 31 <= v <= 2 ** 31 - 1):
            raise Invalid("1003", "Invalid value for field 'numberOfEmployees': %s"
                          % json.dumps(value, ensure_ascii=False)[:60])
        return v
    if field == "annualRevenue":
        v = None
        if isinstance(value, bool):
            v = None
        elif isinstance(value, (int, float)):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                v = None
        if v is None or not math.isfinite(v) or abs(v) > 1e15:
            raise Invalid("1003", "Invalid value for field 'annualRevenue': %s"
                          % json.dumps(value, ensure_ascii=False)[:60])
        return v
    # string-like fields
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise Invalid("1003", "Invalid value for field '%s'" % field)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise Invalid("1003", "Invalid value for field '%s'" % field)
        value = str(value)
    if not isinstance(value, str):
        raise Invalid("1003", "Invalid value for field '%s'" % field)
    limit = FIELD_BY_NAME[field][3] or 255
    if len(value) > limit:
        raise Invalid("1003", "Value for field '%s' exceeds max length of %d" % (field, limit))
    return value


def parse_int_id(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------- store

class Store:
    def __init__(self):
        self.lock = threading.RLock()
        self.rows = {}          # id -> dict (internal: createdAt/updatedAt as epoch ints)
        self.by_ext = {}        # externalCompanyId -> id
        self.max_id = 0

    # all writes go through these three methods (API, admin, mutator)
    def create(self, values, created=None, updated=None):
        with self.lock:
            now = int(time.time())
            self.max_id += 1
            cid = self.max_id
            row = {f: None for f in FIELD_NAMES}
            row["id"] = cid
            for k, v in values.items():
                row[k] = v
            row["createdAt"] = created if created is not None else now
            row["updatedAt"] = updated if updated is not None else now
            self.rows[cid] = row
            if row["externalCompanyId"] is not None:
                self.by_ext[row["externalCompanyId"]] = cid
            return row

    def update(self, row, values):
        with self.lock:
            for k, v in values.items():
                if k == "externalCompanyId" and v != row.get(k):
                    if row.get(k) is not None:
                        self.by_ext.pop(row[k], None)
                    if v is not None:
                        self.by_ext[v] = row["id"]
                row[k] = v
            now = int(time.time())
            row["updatedAt"] = max(now, (row["updatedAt"] or 0) + 1)
            return row

    def delete(self, cid):
        with self.lock:
            row = self.rows.pop(cid, None)
            if row is not None and row["externalCompanyId"] is not None:
                self.by_ext.pop(row["externalCompanyId"], None)
            return row

    def get(self, cid):
        return self.rows.get(cid)

    def get_by_ext(self, ext):
        cid = self.by_ext.get(ext)
        return self.rows.get(cid) if cid is not None else None

    @staticmethod
    def to_json(row, fields=None):
        out = {}
        for f in (fields or FIELD_NAMES):
            v = row.get(f)
            if f in ("createdAt", "updatedAt") and v is not None:
                v = fmt_ts(v)
            out[f] = v
        return out

    def all_json(self):
        with self.lock:
            return [self.to_json(self.rows[k]) for k in sorted(self.rows)]


# --------------------------------------------------------------------------- seed data

NAME_A = ["Acme", "Globex", "Initech", "Umbrella", "Société Générale", "Café Müller",
          "Zürich", "Nordström", "Ærøskøbing", "São Paulo", "Łódź", "Crème Brûlée",
          "O'Reilly", "Smith & Wesson", "Björk", "Dvořák", "Ñandú", "Kraków", "Göteborg",
          "Åkesson", "Hernández", "Renée's", "Château Léoville", "Fjällräven",
          "Müller-Lüdenscheidt", "Citroën", "Brontë", "Señor Frog's", "L'Oréal-ish",
          "Northwind", "Contoso", "Fabrikam", "Tailspin", "Wingtip", "Blue Yonder",
          "Vandelay", "Wonka", "Stark", "Wayne", "Cyberdyne", "Soylent", "Hooli",
          "Pied Piper", "Dunder Mifflin", "Sterling Cooper", "Gringotts", "Møller",
          "Œuvre", "Straße", "İstanbul", "Ελληνική", "Москва", "東京"]
NAME_B = ["Industries", "Holdings", "GmbH", "S.A.", "Ltd.", "Inc.", "& Co.", "AG",
          "Logistics", "Analytics", "Consulting", "Software", "Bakery", "Partners", "Labs",
          "SARL", "Oy", "AB", "KK", "Group", "Trading", "Systems", "LLC", "Pty Ltd",
          "Brothers", "et Fils", "Technologies", "Ventures"]
NAME_MID = ["", "", "", "", "Nord", "Global", "Médical", "Digital", "Pacific", "Atlantic",
            "Alpine", "Royal", "United", "Green", "Première", "Hanseatic", "Andes", "Baltic",
            "Crown", "Delta", "Élan", "Orion", "Sierra", "Union", "Western"]
INDUSTRIES = ["Software", "Manufacturing", "Retail", "Healthcare", "Finance", "Education",
              "Hospitality", "Logistics", "Agriculture", "Energy", "Media", "Non-Profit",
              "Telecommunications", "Construction"]
PLACES = [("Montréal", "QC", "Canada", "H2X 1Y4"), ("München", "Bayern", "Germany", "80331"),
          ("São Paulo", "SP", "Brazil", "01310-100"), ("Zürich", "ZH", "Switzerland", "8001"),
          ("Austin", "TX", "United States", "78701"), ("Chicago", "IL", "United States", "60601"),
          ("Kraków", "Małopolskie", "Poland", "31-042"), ("Reykjavík", None, "Iceland", "101"),
          ("Paris", "Île-de-France", "France", "75001"), ("Tokyo", "東京都", "Japan", "100-0001"),
          ("Springfield", "IL", "United States", "62701"), ("Dublin", None, "Ireland", "D02 X285"),
          ("Québec", "QC", "Canada", "G1R 4P5"), ("Málaga", "Andalucía", "Spain", "29015"),
          ("Göteborg", None, "Sweden", "411 04"), ("New York", "NY", "USA", "10001")]
STREETS = ["Main St.", "Rue Saint-Denis", "Hauptstraße", "Avenida Paulista", "O'Connell Street",
           "Königsallee", "Calle de Alcalá", "Broadway, Suite 500", "Chemin du Lac",
           "Ulica Floriańska"]
SIC = ["7372", "5812", "3571", "6021", "8062", "5411", "4213", "2834", "7011", "8200"]


def gen_phone(rng):
    r = rng.random()
    if r < 0.6:
        return "+1 (%03d) 555-%04d" % (rng.randint(200, 999), rng.randint(0, 9999))
    if r < 0.8:
        return "+49 89 %d" % rng.randint(1000000, 9999999)
    return "%03d.555.%04d" % (rng.randint(200, 999), rng.randint(0, 9999))


def gen_name(rng):
    r = rng.random()
    if r < 0.04:
        return 'The "%s" %s' % (rng.choice(NAME_A), rng.choice(NAME_B))
    if r < 0.08:
        return "%s's %s" % (rng.choice(["Joe", "Zoë", "Anaïs", "Jürgen", "Siobhán"]),
                            rng.choice(NAME_B))
    mid = rng.choice(NAME_MID)
    if mid:
        return "%s %s %s" % (rng.choice(NAME_A), mid, rng.choice(NAME_B))
    return "%s %s" % (rng.choice(NAME_A), rng.choice(NAME_B))


def gen_field(rng, field, num):
    if field == "company":
        return gen_name(rng)
    if field == "website":
        return ("https://www.example-%d.com" % num) if rng.random() < 0.5 else ("example-%d.com" % num)
    if field == "mainPhone":
        return gen_phone(rng)
    if field == "industry":
        return rng.choice(INDUSTRIES)
    if field == "annualRevenue":
        return float(rng.choice([rng.randint(1, 5000) * 10000, round(rng.uniform(1e5, 5e9), 2)]))
    if field == "numberOfEmployees":
        return rng.choice([rng.randint(1, 50), rng.randint(50, 5000), rng.randint(5000, 200000)])
    if field == "billingStreet":
        return "%d %s" % (rng.randint(1, 9999), rng.choice(STREETS))
    if field == "billingCity":
        return rng.choice(PLACES)[0]
    if field == "billingState":
        return rng.choice(PLACES)[1]
    if field == "billingCountry":
        return rng.choice(PLACES)[2]
    if field == "billingPostalCode":
        return rng.choice(PLACES)[3]
    if field == "sicCode":
        return rng.choice(SIC)
    return None


def seed_store(store, n, first_id, seed):
    rng = random.Random(seed)
    store.max_id = first_id - 1
    names, sites = [], []
    t_lo = int(datetime(2019, 1, 1, tzinfo=timezone.utc).timestamp())
    t_hi = int(datetime(2024, 12, 31, tzinfo=timezone.utc).timestamp())
    for i in range(n):
        r = rng.random()
        name = rng.choice(names) if names and r < 0.04 else gen_name(rng)
        names.append(name)
        vals = {"company": name}
        r = rng.random()
        if r < 0.08:
            vals["website"] = None
        elif r < 0.115 and sites:
            vals["website"] = rng.choice(sites)
        else:
            vals["website"] = gen_field(rng, "website", 100 + i)
            sites.append(vals["website"])
        place = rng.choice(PLACES)
        vals.update({
            "mainPhone": gen_phone(rng),
            "industry": rng.choice(INDUSTRIES),
            "annualRevenue": gen_field(rng, "annualRevenue", i),
            "numberOfEmployees": gen_field(rng, "numberOfEmployees", i),
            "billingStreet": gen_field(rng, "billingStreet", i),
            "billingCity": place[0], "billingState": place[1],
            "billingCountry": place[2], "billingPostalCode": place[3],
            "sicCode": rng.choice(SIC),
        })
        sparse = rng.random() < 0.05
        for f in list(vals):
            if f == "company" or (f == "website" and not sparse):
                continue
            if sparse or rng.random() < 0.12:
                vals[f] = None
        if rng.random() < 0.10:
            vals["externalCompanyId"] = "%02dUYA%05dL%06d" % (seed % 100, rng.randint(0, 99999),
                                                             first_id + i)
        created = rng.randint(t_lo, t_hi - 86400 * 30)
        updated = created if rng.random() < 0.3 else rng.randint(created, t_hi)
        store.create(vals, created=created, updated=updated)


# --------------------------------------------------------------------------- limits / stats

class Limits:
    def __init__(self, daily_quota):
        self.lock = threading.Lock()
        self.window = deque()
        self.served_window = deque()
        self.in_flight = 0
        self.daily_quota = daily_quota
        self.quota_day = self._day()
        self.stats = {
            "requests": 0, "rest_calls": 0, "identity_calls": 0, "auth_errors": 0,
            "rate_limited": 0, "conc_limited": 0, "quota_limited": 0,
            "max_calls_in_any_20s_window": 0, "max_served_calls_in_any_20s_window": 0,
            "quota_used": 0, "max_in_flight": 0, "tokens_issued": 0,
            "faults_injected": 0, "faults_by_kind": {k: 0 for k in FAULT_KINDS},
            "codes": {},
        }

    @staticmethod
    def _day():
        return datetime.now(CHICAGO).date().isoformat()

    def bump(self, key, n=1):
        with self.lock:
            self.stats[key] += n

    def code(self, code):
        with self.lock:
            c = self.stats["codes"]
            c[code] = c.get(code, 0) + 1

    def admit(self):
        """Returns None (slot acquired) or (code, message)."""
        with self.lock:
            now = time.monotonic()
            day = self._day()
            if day != self.quota_day:
                self.quota_day = day
                self.stats["quota_used"] = 0
            w = self.window
            while w and w[0] <= now - RATE_WINDOW:
                w.popleft()
            sw = self.served_window
            while sw and sw[0] <= now - RATE_WINDOW:
                sw.popleft()
            before = len(w)
            w.append(now)
            if len(w) > self.stats["max_calls_in_any_20s_window"]:
                self.stats["max_calls_in_any_20s_window"] = len(w)
            if before >= RATE_LIMIT:
                self.stats["rate_limited"] += 1
                self.stats["quota_used"] += 1
                return ("606", "Max rate limit '%d' exceeded with in '%d' secs"
                        % (RATE_LIMIT, int(RATE_WINDOW)))
            if self.stats["quota_used"] >= self.daily_quota:
                self.stats["quota_limited"] += 1
                return ("607", "Daily quota reached")
            self.stats["quota_used"] += 1
            if self.in_flight >= MAX_CONCURRENT:
                self.stats["conc_limited"] += 1
                return ("615", "Concurrent access limit reached")
            self.in_flight += 1
            if self.in_flight > self.stats["max_in_flight"]:
                self.stats["max_in_flight"] = self.in_flight
            sw.append(now)
            if len(sw) > self.stats["max_served_calls_in_any_20s_window"]:
                self.stats["max_served_calls_in_any_20s_window"] = len(sw)
            return None

    def release(self):
        with self.lock:
            self.in_flight -= 1

    def snapshot(self):
        with self.lock:
            s = json.loads(json.dumps(self.stats))
            now = time.monotonic()
            s["calls_in_current_20s_window"] = sum(1 for t in self.window if t > now - RATE_WINDOW)
            s["in_flight"] = self.in_flight
            s["daily_quota"] = self.daily_quota
            s["quota_day"] = self.quota_day
            return s


class Faults:
    def __init__(self, seed):
        self.lock = threading.Lock()
        self.rate = 0.0
        self.kinds = list(FAULT_KINDS)
        self.rng = random.Random(seed * 7919 + 17)

    def pick(self):
        with self.lock:
            if self.rate <= 0:
                return None
            if self.rng.random() < self.rate:
                return self.rng.choice(self.kinds)
            return None


# --------------------------------------------------------------------------- tokens

class Tokens:
    def __init__(self, ttl):
        self.ttl = ttl
        self.lock = threading.Lock()
        self.tokens = {}  # token -> expiry (wall clock)

    def issue(self):
        tok = "%s:ab" % uuid.uuid4()
        with self.lock:
            self.tokens[tok] = time.time() + self.ttl
        return tok

    def check(self, tok):
        with self.lock:
            exp = self.tokens.get(tok)
        if exp is None:
            return ("601", "Access token invalid")
        if time.time() >= exp:
            return ("602", "Access token expired")
        return None


PAGE_SECRET = os.urandom(16)


def make_page_token(offset):
    issued = int(time.time() * 1000)
    payload = struct.pack(">I", offset) + issued.to_bytes(6, "big")
    mac = hmac.new(PAGE_SECRET, payload, hashlib.sha256).digest()[:8]
    return base64.b32encode(payload + mac).decode("ascii")


def read_page_token(tok):
    """Returns offset or None if invalid/expired."""
    try:
        t = tok.strip().upper()
        t += "=" * (-len(t) % 8)
        raw = base64.b32decode(t)
    except Exception:
        return None
    if len(raw) != 18:
        return None
    payload, mac = raw[:10], raw[10:]
    if not hmac.compare_digest(mac, hmac.new(PAGE_SECRET, payload, hashlib.sha256).digest()[:8]):
        return None
    offset = struct.unpack(">I", payload[:4])[0]
    issued = int.from_bytes(payload[4:], "big") / 1000.0
    if time.time() - issued > TOKEN_VALIDITY:
        return None
    return offset


# --------------------------------------------------------------------------- API logic

class ApiError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def request_id():
    return "%04x#%x" % (random.getrandbits(16), int(time.time() * 1000))


def ok(result, **extra):
    d = {"requestId": request_id(), "success": True, "result": result}
    d.update(extra)
    return d


def err(code, message):
    return {"requestId": request_id(), "success": False,
            "errors": [{"code": str(code), "message": message}]}


def multi_values(params, name):
    vals = []
    for raw in params.get(name, []):
        for part in raw.split(","):
            p = part.strip()
            if p:
                vals.append(p)
    return vals


class Api:
    def __init__(self, store, limits, args):
        self.store = store
        self.limits = limits
        self.args = args

    # ---- describe / schema
    def describe(self):
        fields = []
        for name, disp, dt, length, upd in FIELD_DEFS:
            f = {"name": name, "displayName": disp, "dataType": dt}
            if length:
                f["length"] = length
            f["updateable"] = upd
            fields.append(f)
        return ok([{
            "name": "Company", "description": "Company object",
            "createdAt": "2015-05-11T17:11:32Z", "updatedAt": "2015-05-11T17:11:32Z",
            "idField": "id", "dedupeFields": ["externalCompanyId"],
            "searchableFields": [["externalCompanyId"], ["id"], ["company"]],
            "fields": fields,
        }])

    @staticmethod
    def _schema_field(fd):
        name, disp, dt, length, _ = fd
        f = {"displayName": disp, "name": name, "description": None, "dataType": dt}
        if length:
            f["length"] = length
        f.update({"isHidden": False, "isHtmlEncodingInEmail": dt in ("string", "url", "phone"),
                  "isSensitive": False, "isCustom": False, "isApiCreated": False})
        return f

    def schema_fields(self, params):
        batch = self._batch_size(params)
        offset = self._offset(params)
        allf = [self._schema_field(fd) for fd in FIELD_DEFS]
        page = allf[offset:offset + batch]
        more = offset + batch < len(allf)
        extra = {"moreResult": more}
        if more:
            extra["nextPageToken"] = make_page_token(offset + batch)
        return ok(page, **extra)

    def schema_field(self, name):
        fd = FIELD_BY_NAME.get(name)
        if fd is None:
            raise ApiError("1006", "Field '%s' not found" % name)
        return ok([self._schema_field(fd)])

    def usage(self):
        s = self.limits.snapshot()
        return ok([{"date": s["quota_day"], "total": s["quota_used"],
                    "users": [{"userId": "%s@api.example.com" % self.args.client_id,
                               "count": s["quota_used"]}]}])

    # ---- query
    @staticmethod
    def _batch_size(params):
        vals = params.get("batchSize")
        if not vals or vals[-1].strip() == "":
            return MAX_BATCH
        try:
            b = int(vals[-1].strip())
        except ValueError:
            raise ApiError("1003", "Invalid batchSize '%s'" % vals[-1])
        if b < 1 or b > MAX_BATCH:
            raise ApiError("1003", "batchSize must be between 1 and %d" % MAX_BATCH)
        return b

    @staticmethod
    def _offset(params):
        vals = params.get("nextPageToken")
        if not vals or vals[-1] == "":
            return 0
        off = read_page_token(vals[-1])
        if off is None:
            raise ApiError("1003", "Invalid nextPageToken")
        return off

    def query(self, params):
        ft_raw = params.get("filterType", [""])[-1].strip()
        if not ft_raw:
            raise ApiError("701", "'filterType' cannot be blank")
        ft = FILTER_TYPES.get(ft_raw)
        if ft is None:
            raise ApiError("1003", "Invalid filterType '%s'" % ft_raw)
        values = multi_values(params, "filterValues")
        if not values:
            raise ApiError("701", "'filterValues' cannot be blank")
        if len(values) > MAX_BATCH:
            raise ApiError("1003", "filterValues exceeded the max of %d" % MAX_BATCH)
        fields = multi_values(params, "fields")
        if fields:
            for f in fields:
                if f not in FIELD_SET:
                    raise ApiError("1006", "Field '%s' not found" % f)
            out_fields = ["id"] + [f for i, f in enumerate(fields)
                                   if f != "id" and f not in fields[:i]]
        else:
            out_fields = list(DEFAULT_QUERY_FIELDS)
        batch = self._batch_size(params)
        offset = self._offset(params)
        with self.store.lock:
            rows = self.store.rows
            if ft == "id":
                ids = set()
                for v in values:
                    iv = parse_int_id(v)
                    if iv is None:
                        raise ApiError("1003", "Invalid filterValues '%s' for filterType 'id'" % v)
                    ids.add(iv)
                matched = sorted(i for i in ids if i in rows)
            elif ft == "externalCompanyId":
                vs = set(values)
                matched = sorted(self.store.by_ext[v] for v in vs if v in self.store.by_ext)
            else:
                vs = set(v.casefold() for v in values)
                matched = sorted(cid for cid, r in rows.items()
                                 if r["company"] is not None and r["company"].casefold() in vs)
            page_ids = matched[offset:offset + batch]
            result = []
            for seq, cid in enumerate(page_ids):
                j = {"seq": seq}
                j.update(Store.to_json(rows[cid], out_fields))
                result.append(j)
            more = offset + batch < len(matched)
        extra = {"moreResult": more}
        if more:
            extra["nextPageToken"] = make_page_token(offset + batch)
        return ok(result, **extra)

    # ---- sync
    @staticmethod
    def _input(body):
        inp = body.get("input")
        if inp is None or not isinstance(inp, list) or not inp:
            raise ApiError("701", "'input' cannot be blank")
        if len(inp) > MAX_BATCH:
            raise ApiError("1003", "Batch size exceeded the max of %d" % MAX_BATCH)
        return inp

    def sync(self, body):
        action = body.get("action") or "createOrUpdate"
        if action not in ("createOnly", "updateOnly", "createOrUpdate"):
            raise ApiError("1003", "Invalid action '%s'" % action)
        dedupe = body.get("dedupeBy") or "dedupeFields"
        if dedupe not in ("dedupeFields", "idField"):
            raise ApiError("1003", "Invalid dedupeBy '%s'" % dedupe)
        if dedupe == "idField" and action == "createOnly":
            raise ApiError("1003", "dedupeBy 'idField' is not allowed with action 'createOnly'")
        inp = self._input(body)
        results = []
        seen = set()
        with self.store.lock:
            for seq, rec in enumerate(inp):
                try:
                    results.append(self._sync_one(seq, rec, action, dedupe, seen))
                except Invalid as e:
                    results.append({"seq": seq, "status": "skipped",
                                    "reasons": [{"code": e.code, "message": e.message}]})
        return ok(results)

    def _sync_one(self, seq, rec, action, dedupe, seen):
        if not isinstance(rec, dict):
            raise Invalid("1003", "Invalid input record")
        for k in rec:
            if k not in FIELD_SET:
                raise Invalid("1006", "Field '%s' not found" % k)
        for k in ("createdAt", "updatedAt"):
            if k in rec:
                raise Invalid("1003", "Field '%s' is not updateable" % k)
        if dedupe == "dedupeFields":
            if "id" in rec:
                raise Invalid("1003", "Field 'id' not allowed with dedupeBy 'dedupeFields'")
            if rec.get("externalCompanyId") in (None, ""):
                raise Invalid("1003", "Value for required field 'externalCompanyId' not specified")
            key = coerce_value("externalCompanyId", rec["externalCompanyId"])
        else:
            if rec.get("id") in (None, ""):
                raise Invalid("1003", "Value for required field 'id' not specified")
            key = parse_int_id(rec["id"])
            if key is None:
                raise Invalid("1003", "Invalid value for field 'id'")
        values = {}
        for k, v in rec.items():
            if k == "id":
                continue
            values[k] = coerce_value(k, v)
        if key in seen:
            raise Invalid("1036", "Duplicate value in input for '%s'"
                          % ("externalCompanyId" if dedupe == "dedupeFields" else "id"))
        seen.add(key)
        existing = self.store.get_by_ext(key) if dedupe == "dedupeFields" else self.store.get(key)
        if existing is not None:
            if action == "createOnly":
                raise Invalid("1005", "Company already exists")
            if "externalCompanyId" in values and values["externalCompanyId"] != existing["externalCompanyId"]:
                raise Invalid("1003", "Field 'externalCompanyId' cannot be updated")
            values.pop("externalCompanyId", None)
            self.store.update(existing, values)
            return {"seq": seq, "status": "updated", "id": existing["id"]}
        if action == "updateOnly" or dedupe == "idField":
            raise Invalid("1013", "Record not found")
        row = self.store.create(values)
        return {"seq": seq, "status": "created", "id": row["id"]}

    # ---- delete
    def delete(self, body):
        by = body.get("deleteBy") or "dedupeFields"
        if by not in ("dedupeFields", "idField"):
            raise ApiError("1003", "Invalid deleteBy '%s'" % by)
        inp = self._input(body)
        results = []
        with self.store.lock:
            for seq, rec in enumerate(inp):
                reason = None
                row = None
                if not isinstance(rec, dict):
                    reason = ("1003", "Invalid input record")
                elif by == "dedupeFields":
                    ext = rec.get("externalCompanyId")
                    if not isinstance(ext, str) or ext == "":
                        reason = ("1003", "Value for required field 'externalCompanyId' not specified")
                    else:
                        row = self.store.get_by_ext(ext)
                else:
                    cid = parse_int_id(rec.get("id"))
                    if cid is None:
                        reason = ("1003", "Value for required field 'id' not specified")
                    else:
                        row = self.store.get(cid)
                if reason is None and row is None:
                    reason = ("1013", "Record not found")
                if reason:
                    results.append({"seq": seq, "status": "skipped",
                                    "reasons": [{"code": reason[0], "message": reason[1]}]})
                else:
                    self.store.delete(row["id"])
                    results.append({"seq": seq, "id": row["id"], "status": "deleted"})
        return ok(results)

    # ---- admin
    def admin_mutate(self, body):
        """Returns (http_status, json)."""
        if not isinstance(body, dict):
            return 400, {"error": "body must be a JSON object"}
        with self.store.lock:
            if "id" in body and body["id"] is not None:
                cid = parse_int_id(body["id"])
                row = self.store.get(cid) if cid is not None else None
                if row is None:
                    return 404, {"error": "company %r not found" % body["id"]}
                if body.get("delete"):
                    self.store.delete(cid)
                    return 200, {"id": cid, "deleted": True}
            else:
                row = None
            fields = body.get("fields") or {}
            if not isinstance(fields, dict):
                return 400, {"error": "fields must be an object"}
            values = {}
            for k, v in fields.items():
                if k not in WRITABLE:
                    return 400, {"error": "field '%s' is unknown or read-only" % k}
                try:
                    values[k] = coerce_value(k, v)
                except Invalid as e:
                    return 400, {"error": e.message}
            ext = values.get("externalCompanyId")
            if ext is not None:
                other = self.store.get_by_ext(ext)
                if other is not None and (row is None or other["id"] != row["id"]):
                    return 409, {"error": "externalCompanyId %r already used by %d" % (ext, other["id"])}
            if row is None:
                row = self.store.create(values)
            else:
                self.store.update(row, values)
            return 200, Store.to_json(row)


# --------------------------------------------------------------------------- mutator

def mutator(store, rate, seed):
    rng = random.Random(seed * 31 + 5)
    period = 1.0 / rate
    editable = ["company", "website", "mainPhone", "industry", "annualRevenue",
                "numberOfEmployees", "billingStreet", "billingCity", "billingState",
                "billingCountry", "billingPostalCode", "sicCode"]
    n = 0
    while True:
        time.sleep(period)
        n += 1
        with store.lock:
            r = rng.random()
            ids = list(store.rows)
            if r < 0.2 or not ids:
                vals = {f: gen_field(rng, f, 900000 + n) for f in editable}
                store.create(vals)
            elif r < 0.3:
                row = store.rows[rng.choice(ids)]
                store.update(row, {rng.choice(editable[1:]): None})
            else:
                row = store.rows[rng.choice(ids)]
                vals = {}
                for f in rng.sample(editable, rng.choice([1, 2])):
                    vals[f] = gen_field(rng, f, 800000 + n)
                store.update(row, vals)


# --------------------------------------------------------------------------- HTTP

HTML_500 = (b"<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head>"
            b"<body><h1>Internal Server Error</h1><p>The server encountered an internal "
            b"error and was unable to complete your request.</p></body></html>")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    sys_version = ""

    # set on the class in main()
    api = None
    limits = None
    tokens = None
    faults = None
    args = None

    def log_message(self, fmt, *a):  # silence default logging
        pass

    def log_line(self, status, code):
        path = self.path if len(self.path) <= 300 else self.path[:300] + "...(%d chars)" % len(self.path)
        sys.stderr.write("%s %s %s -> %s/%s\n" % (
            datetime.now().strftime("%H:%M:%S.%f")[:-3], self.command, path, status, code))
        sys.stderr.flush()

    # ---- body
    def read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        l2 = self.rfile.readline(65537)
                        if l2 in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    # ---- senders
    def send_raw(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status, obj, code=None):
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_raw(status, body, "application/json;charset=UTF-8")
        if code is None:
            code = marketo_code(obj)
        self.log_line(status, code)

    # ---- dispatch
    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def do_PATCH(self):
        self.dispatch()

    def dispatch(self):
        try:
            body = self.read_body()
        except Exception:
            self.close_connection = True
            self.send_json(400, {"error": "bad request body"}, "badbody")
            return
        parts = urlsplit(self.path)
        path = parts.path
        params = parse_qs(parts.query, keep_blank_values=True)
        if path.startswith("/__admin/"):
            return self.admin(path, body)
        self.limits.bump("requests")
        if path in ("/identity/oauth/token", "/identity/oauth/token/"):
            return self.identity(params, body)
        if path.startswith("/rest/"):
            return self.rest(path, params, body)
        time.sleep(0.01)
        self.send_json(404, {"error": "not_found", "error_description": "No such path"}, "404")

    # ---- admin
    def admin(self, path, body):
        cmd = self.command
        if path == "/__admin/companies" and cmd == "GET":
            return self.send_json(200, self.api.store.all_json(), "admin")
        if path == "/__admin/stats" and cmd == "GET":
            return self.send_json(200, self.limits.snapshot(), "admin")
        if cmd == "POST" and path in ("/__admin/mutate", "/__admin/faults"):
            try:
                obj = json.loads(body.decode("utf-8") or "{}")
            except Exception:
                return self.send_json(400, {"error": "invalid JSON"}, "admin")
            if path == "/__admin/mutate":
                status, out = self.api.admin_mutate(obj)
                return self.send_json(status, out, "admin")
            if not isinstance(obj, dict):
                return self.send_json(400, {"error": "body must be an object"}, "admin")
            try:
                rate = float(obj.get("rate", 0))
            except (TypeError, ValueError):
                return self.send_json(400, {"error": "rate must be a number"}, "admin")
            kinds = obj.get("kinds") or list(FAULT_KINDS)
            if not isinstance(kinds, list) or any(str(k) not in FAULT_KINDS for k in kinds):
                return self.send_json(400, {"error": "kinds must be a subset of %s" % FAULT_KINDS},
                                      "admin")
            with self.faults.lock:
                self.faults.rate = max(0.0, min(1.0, rate))
                self.faults.kinds = [str(k) for k in kinds]
                cfg = {"rate": self.faults.rate, "kinds": self.faults.kinds}
            return self.send_json(200, cfg, "admin")
        return self.send_json(404, {"error": "unknown admin endpoint"}, "admin")

    # ---- identity
    def identity(self, params, body):
        time.sleep(0.01)
        self.limits.bump("identity_calls")
        p = {k: v[-1] for k, v in params.items()}
        if body:
            ctype = (self.headers.get("Content-Type") or "").lower()
            try:
                if "json" in ctype:
                    obj = json.loads(body.decode("utf-8"))
                    if isinstance(obj, dict):
                        p.update({k: str(v) for k, v in obj.items()})
                else:
                    p.update({k: v[-1] for k, v in parse_qs(body.decode("utf-8"),
                                                            keep_blank_values=True).items()})
            except Exception:
                pass
        if self.command not in ("GET", "POST"):
            return self.send_json(405, {"error": "invalid_request",
                                        "error_description": "Method not allowed"}, "405")
        gt = p.get("grant_type")
        if not gt:
            return self.send_json(400, {"error": "invalid_request",
                                        "error_description": "Missing grant type"}, "400")
        if gt != "client_credentials":
            return self.send_json(400, {"error": "unsupported_grant_type",
                                        "error_description": "Unsupported grant type: %s" % gt}, "400")
        if p.get("client_id") != self.args.client_id or p.get("client_secret") != self.args.client_secret:
            return self.send_json(401, {"error": "unauthorized",
                                        "error_description": "Bad client credentials"}, "401")
        tok = self.tokens.issue()
        self.limits.bump("tokens_issued")
        return self.send_json(200, {"access_token": tok, "token_type": "bearer",
                                    "expires_in": int(self.args.token_ttl),
                                    "scope": "%s@api.example.com" % self.args.client_id}, "token")

    # ---- REST
    def rest(self, path, params, body):
        self.limits.bump("rest_calls")
        ctype = (self.headers.get("Content-Type") or "").lower()
        form = {}
        if self.command == "POST" and body and "x-www-form-urlencoded" in ctype:
            try:
                form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
            except Exception:
                form = {}
        # token
        tok = None
        auth = self.headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            tok = auth[7:].strip()
        if not tok:
            tok = (params.get("access_token") or form.get("access_token") or [""])[-1].strip()
        if not tok:
            time.sleep(0.01)
            self.limits.bump("auth_errors")
            return self.answer(err("600", "Access token not specified"))
        bad = self.tokens.check(tok)
        if bad:
            time.sleep(0.01)
            self.limits.bump("auth_errors")
            return self.answer(err(*bad))
        rej = self.limits.admit()
        if rej:
            time.sleep(0.01)
            return self.answer(err(*rej))
        try:
            time.sleep(0.01)
            fault = self.faults.pick()
            if fault:
                self.limits.bump("faults_injected")
                with self.limits.lock:
                    self.limits.stats["faults_by_kind"][fault] += 1
            if fault == "500":
                self.send_raw(500, HTML_500, "text/html; charset=utf-8")
                self.limits.code("500")
                self.log_line(500, "fault-500")
                return
            if fault == "604":
                return self.answer(err("604", "Request timed out"), "fault-604")
            if fault == "606":
                return self.answer(err("606", "Max rate limit '%d' exceeded with in '%d' secs"
                                       % (RATE_LIMIT, int(RATE_WINDOW))), "fault-606")
            if fault == "602":
                return self.answer(err("602", "Access token expired"), "fault-602")
            resp = self.route(path, params, form, body, ctype)
            if fault == "slow":
                time.sleep(3.0)
            if fault == "drop":
                self.close_connection = True
                self.limits.code("drop")
                self.log_line("-", "fault-drop")
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault == "malformed":
                raw = json.dumps(resp, ensure_ascii=False).encode("utf-8")
                cut = raw[:max(1, len(raw) // 2)]
                self.send_raw(200, cut, "application/json;charset=UTF-8")
                self.limits.code("malformed")
                self.log_line(200, "fault-malformed")
                return
            return self.answer(resp, "fault-slow/" + marketo_code(resp) if fault == "slow" else None)
        finally:
            self.limits.release()

    def answer(self, obj, label=None):
        code = marketo_code(obj)
        self.limits.code(code)
        self.send_json(200, obj, label or code)

    def route(self, path, params, form, body, ctype):
        api = self.api
        m = self.command
        try:
            if len(self.path) > MAX_URI:
                return err("414", "Request URI too long")
            if len(body) > MAX_BODY:
                return err("413", "Request entity too large")
            if path == "/rest/v1/companies.json":
                method_override = (params.get("_method") or [""])[-1].upper()
                if m == "GET" or (m == "POST" and method_override == "GET"):
                    q = {k: list(v) for k, v in params.items()}
                    if m == "POST":
                        if form:
                            q.update(form)
                        elif body and "json" in ctype:
                            try:
                                obj = json.loads(body.decode("utf-8"))
                            except Exception:
                                return err("609", "Invalid JSON")
                            if isinstance(obj, dict):
                                for k, v in obj.items():
                                    if isinstance(v, list):
                                        q[k] = [",".join(str(x) for x in v)]
                                    else:
                                        q[k] = [str(v)]
                    return api.query(q)
                if m == "POST":
                    return api.sync(self.json_body(body, ctype))
                return err("605", "Request method '%s' not supported" % m)
            if path == "/rest/v1/companies/sync.json":
                if m != "POST":
                    return err("605", "Request method '%s' not supported" % m)
                return api.sync(self.json_body(body, ctype))
            if path == "/rest/v1/companies/delete.json":
                if m != "POST":
                    return err("605", "Request method '%s' not supported" % m)
                return api.delete(self.json_body(body, ctype))
            if path == "/rest/v1/companies/describe.json":
                if m != "GET":
                    return err("605", "Request method '%s' not supported" % m)
                return api.describe()
            if path == "/rest/v1/companies/schema/fields.json":
                if m != "GET":
                    return err("605", "Request method '%s' not supported" % m)
                return api.schema_fields(params)
            if path.startswith("/rest/v1/companies/schema/fields/") and path.endswith(".json"):
                if m != "GET":
                    return err("605", "Request method '%s' not supported" % m)
                return api.schema_field(path[len("/rest/v1/companies/schema/fields/"):-5])
            if path == "/rest/v1/stats/usage.json":
                if m != "GET":
                    return err("605", "Request method '%s' not supported" % m)
                return api.usage()
            return err("610", "Requested resource not found")
        except ApiError as e:
            return err(e.code, e.message)

    @staticmethod
    def json_body(body, ctype):
        if "json" not in ctype:
            raise ApiError("612", "Invalid Content Type")
        try:
            obj = json.loads(body.decode("utf-8"))
        except Exception:
            raise ApiError("609", "Invalid JSON")
        if not isinstance(obj, dict):
            raise ApiError("609", "Invalid JSON")
        return obj


def marketo_code(obj):
    if isinstance(obj, dict):
        if obj.get("success") is True:
            return "ok"
        errs = obj.get("errors")
        if errs:
            return str(errs[0].get("code"))
    return "-"


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main():
    ap = argparse.ArgumentParser(description="Independent Marketo Companies API mock")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--client-secret", required=True)
    ap.add_argument("--companies", type=int, default=100)
    ap.add_argument("--first-id", type=int, default=1)
    ap.add_argument("--token-ttl", type=float, default=3600)
    ap.add_argument("--mutations-per-second", type=float, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--daily-quota", type=int, default=50000)
    args = ap.parse_args()

    store = Store()
    seed_store(store, args.companies, args.first_id, args.seed)
    limits = Limits(args.daily_quota)
    Handler.api = Api(store, limits, args)
    Handler.limits = limits
    Handler.tokens = Tokens(args.token_ttl)
    Handler.faults = Faults(args.seed)
    Handler.args = args

    srv = Server(("127.0.0.1", args.port), Handler)
    if args.mutations_per_second > 0:
        threading.Thread(target=mutator, args=(store, args.mutations_per_second, args.seed),
                         daemon=True).start()
    sys.stderr.write("marketo mock (variant) on http://127.0.0.1:%d/rest  companies=%d first-id=%d "
                     "seed=%d ttl=%ss\n" % (args.port, args.companies, args.first_id, args.seed,
                                            args.token_ttl))
    sys.stderr.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
