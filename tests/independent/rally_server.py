#!/usr/bin/env python3
"""Independent mock of the Rally CRM Companies API (black-box test target).

Written only from /work/shared/api/{rally-companies.txt, rally-notes.md, README.md, pitfalls.md}.
Start: python3 server.py --port 9701 --api-key KEY --companies N --rps 10 \
           --mutations-per-second R --seed S
Auth: header `X-Api-Key: KEY` (header name case-insensitive, value exact).

Choices made where the documents are silent (what a plausible .NET SaaS CRM would do):
 1. Status codes: POST create 201 (+Location); GET/PUT 200 with CompanyResponse; DELETE 204 with
    no body; upsert 200 for both "created" and "updated"; bulk 200 even when every record failed.
 2. Errors are always JSON {"error": "..."}: 400 validation/bad query/bad JSON, 401 missing or
    wrong key, 404 unknown id (also a non-GUID id) or unknown path, 405 wrong method on a known
    path, 409 domain already used by another company, 415 body without application/json,
    429 rate limited (Retry-After, integer seconds, >= 1), 500/503 only when faults are injected.
 3. Order of checks per API request: rate limit -> auth -> injected fault -> routing/validation.
    401 and 404 responses still consume rate-limit budget.
 4. Rate limit: sliding window of --rps accepted requests in any 1 s, global (one tenant/key);
    rejected (429) requests do not consume budget. --rps 0 disables it.
 5. List: bare JSON array, no total/next link/paging headers. Default limit 50; limit > 100 is
    clamped to 100; limit < 1, non-integer limit/offset or offset < 0 -> 400. Query parameter
    names are matched case-insensitively (ASP.NET binding); repeated parameters: last one wins.
 6. List order: createdAt ascending, then id (lowercase string) ascending; updatedSince (>=,
    inclusive) filters BEFORE offset/limit are applied, so concurrent creates/deletes/updates
    shift offsets exactly like a real offset-paged API.
 7. updatedSince accepts ISO-8601 date or date-time, 'T' or space separator, any number of
    fractional digits (truncated to microseconds), 'Z' or +hh:mm/-hh:mm offset; a value without
    a zone is taken as UTC. An unencoded '+' (decoded as space) -> 400.
 8. fields: comma-separated, case-insensitive, unknown names ignored; "id" is always returned.
    fields only applies to the list endpoint (as documented: "List endpoints support ...").
 9. Timestamps are emitted UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ (always 6 fractional digits).
    Every write (PUT, upsert-update, bulk-update, admin mutate, mutator) bumps updatedAt even if
    no value changed. All records written by one bulk call share the same timestamp, and when
    N >= 40 a block of seeded companies (a "migration import", up to 150) shares one identical
    createdAt/updatedAt, so more rows than a page can hold share one timestamp.
10. annualRevenue is kept as an exact Decimal with the scale the client sent (45000000 stays
    45000000, 12.50 stays 12.50) and written as a bare JSON number, never via float. Seeds have
    2 decimals; ~3% of seeds have >17 significant digits (not representable as f64).
11. Request bodies: property names matched case-insensitively; unknown properties and read-only
    ones (id, tenantId, createdAt, updatedAt) are ignored. Wrong JSON types -> 400. Explicit
    null clears a field (tags: null -> []). employeeCount must be an integer 0..2147483647
    (250.0 is rejected). ownerId must be a GUID (stored lowercase). NaN/Infinity rejected.
    No string length limits. Strings are stored as sent, except domain which is trimmed and an
    empty/blank domain is stored as null.
12. PUT /{id} is partial: only properties present in the body change; "name" if present must be a
    non-blank string. POST and upsert require name. Upsert-update also only overwrites the
    properties present in the body.
13. Domain matching (upsert, bulk, 409 conflicts) is case-insensitive on the trimmed value; no
    other normalisation ("www.acme.com" != "acme.com"); the stored spelling is kept as sent.
    Upsert without a domain -> 400 "Domain is required for upsert".
14. Bulk body: a JSON array, or an object {"companies": [...]}. More than 100 -> 400 (whole
    request rejected); empty array -> 200 with zero counts. Processed in order, not atomic;
    records with a domain that matches (including one created earlier in the same batch) are
    updated; records without one are always created. Non-object items fail with an error.
15. Deletes are hard deletes: no tombstones, no deleted-since feed; DELETE of unknown id -> 404.
16. One fixed tenantId per server (derived from --seed). ids are random v4 GUIDs (seeded).
17. Faults (/__admin/faults {"rate": r, "kinds": [...]}) hit only API calls that passed rate
    limit and auth. Kinds: "500", "503" (with Retry-After: 1) -> returned before any effect;
    "drop" -> connection closed without a response, half the time BEFORE the request is applied
    and half the time AFTER it was committed; "malformed" -> request applied, 200 with a
    truncated JSON body (correct Content-Length). Default kinds: all four.
18. Mutator: each tick ~88% edits one field of a random company, ~2% changes its domain (to a new
    unique one), ~6% creates one, ~4% deletes one (never below 1 company).
19. Extra admin endpoints: DELETE /__admin/companies/{id} (user deletion), POST
    /__admin/stats/reset, GET /__admin/faults. Stats also report faults_injected and mutations.
    "requests" counts every API request (incl. 429s); max_requests_in_any_1s_window counts
    arrivals (incl. rejected ones) in any sliding 1 s window.
20. HTTP/1.1 keep-alive; chunked request bodies are accepted; binds 127.0.0.1 only.
"""
import argparse, json, math, random, re, socket, sys, threading, time, uuid
from collections import deque
from datetime import datetime, timezone, timedelta
from decimal import Decimal
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlsplit, parse_qsl

FIELDS = ["id", "tenantId", "name", "domain", "industry", "description", "employeeCount",
          "annualRevenue", "phone", "website", "linkedInUrl", "address", "city", "state",
          "country", "postalCode", "tags", "notes", "ownerId", "createdAt", "updatedAt"]
WRITABLE = ["name", "domain", "industry", "description", "employeeCount", "annualRevenue", "phone",
            "website", "linkedInUrl", "address", "city", "state", "country", "postalCode", "tags",
            "notes", "ownerId"]
STRINGS = {"name", "domain", "industry", "description", "phone", "website", "linkedInUrl",
           "address", "city", "state", "country", "postalCode", "notes"}
FIELD_BY_LOWER = {f.lower(): f for f in FIELDS}
WRITABLE_BY_LOWER = {f.lower(): f for f in WRITABLE}
GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
TS_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
                   r"(Z|z|[+-]\d{2}:?\d{2})?$")

class ApiError(Exception):
    def __init__(self, status, msg):
        super().__init__(msg)
        self.status, self.msg = status, msg

def utcnow():
    return datetime.now(timezone.utc)

def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ".%06dZ" % dt.microsecond

def parse_ts(s):
    m = TS_RE.match(s.strip()) if s is not None else None
    if not m:
        raise ApiError(400, "Invalid updatedSince: expected an ISO-8601 timestamp, e.g. 2025-01-01T00:00:00Z")
    y, mo, d, h, mi, se, frac, tz = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(se or 0),
                      int((frac or "0")[:6].ljust(6, "0")), tzinfo=timezone.utc)
    except ValueError:
        raise ApiError(400, "Invalid updatedSince: not a valid date/time")
    if tz and tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        dt -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return dt

def enc(o):
    """JSON encoder that writes Decimal as an exact bare number and datetimes as ISO-8601 Z."""
    if isinstance(o, dict):
        return "{" + ",".join(json.dumps(k) + ":" + enc(v) for k, v in o.items()) + "}"
    if isinstance(o, (list, tuple)):
        return "[" + ",".join(enc(v) for v in o) + "]"
    if isinstance(o, Decimal):
        return format(o, "f")
    if isinstance(o, datetime):
        return '"' + iso(o) + '"'
    return json.dumps(o, ensure_ascii=False)

def _bad_constant(c):
    raise ValueError("invalid number " + c)

def parse_json(raw):
    try:
        return json.loads(raw.decode("utf-8"), parse_float=Decimal, parse_constant=_bad_constant)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "Invalid JSON body")

def validate(body, require_name):
    """Return dict of canonical writable field -> cleaned value for keys present in body."""
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    out = {}
    for k, v in body.items():
        f = WRITABLE_BY_LOWER.get(str(k).lower())
        if f is None:
            continue  # unknown or read-only property: ignored
        if f in STRINGS:
            if v is not None and not isinstance(v, str):
                raise ApiError(400, "'%s' must be a string or null" % f)
            if f == "domain" and v is not None:
                v = v.strip() or None
        elif f == "employeeCount":
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 2147483647):
                raise ApiError(400, "'employeeCount' must be an integer between 0 and 2147483647 or null")
        elif f == "annualRevenue":
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, Decimal)) or not Decimal(v).is_finite():
                    raise ApiError(400, "'annualRevenue' must be a decimal number or null")
                v = Decimal(v)
        elif f == "tags":
            if v is None:
                v = []
            if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
                raise ApiError(400, "'tags' must be an array of strings")
            v = list(v)
        elif f == "ownerId":
            if v is not None:
                if not isinstance(v, str) or not GUID_RE.match(v.strip()):
                    raise ApiError(400, "'ownerId' must be a GUID or null")
                v = v.strip().lower()
        out[f] = v
    if require_name or "name" in out:
        n = out.get("name")
        if not isinstance(n, str) or not n.strip():
            raise ApiError(400, "Company name is required")
    return out

# ----------------------------------------------------------------------------- seed data
PREFIX = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay", "Soylent",
          "Cyberdyne", "Tyrell", "Wonka", "Gringotts", "Oscorp", "Aperture", "Massive", "Blue Harbor",
          "Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware", "Proseware", "Adatum", "Woodgrove",
          "Lumen", "Quantum", "Silverline", "Redwood", "Ironclad", "Brightpath", "Nimbus", "Polaris",
          "Summit", "Vertex", "Zephyr", "Keystone", "Evergreen", "Cobalt", "Orchid", "Falcon"]
SUFFIX = ["Labs", "Systems", "Corporation", "Group", "Holdings", "Analytics", "Foods", "Logistics",
          "Capital", "Health", "Energy", "Robotics", "Media", "Software", "Partners", "Industries",
          "Networks", "Dynamics", "Ventures", "Solutions"]
EXOTIC = ["Müller & Söhne GmbH", "Société Lumière SA", "Østergaard ApS", "東京テック株式会社",
          "O'Brien \"Quality\" Builders", "Zürich Réassurance AG", "São Paulo Alimentos Ltda"]
INDUSTRIES = ["Technology", "Healthcare", "Finance", "Manufacturing", "Retail", "Education",
              "Energy", "Logistics", "Media", "Hospitality", "Real Estate", "Agriculture"]
PLACES = {"US": [("San Francisco", "CA", "94105"), ("New York", "NY", "10001"), ("Austin", "TX", "73301")],
          "GB": [("London", None, "EC1A 1BB"), ("Manchester", None, "M1 1AE")],
          "DE": [("Berlin", None, "10115"), ("München", "BY", "80331")],
          "FR": [("Paris", None, "75001"), ("Lyon", None, "69001")],
          "JP": [("Tokyo", None, "100-0001")], "BR": [("São Paulo", "SP", "01000-000")],
          "IN": [("Bengaluru", "KA", "560001")], "CA": [("Toronto", "ON", "M5H 2N2")],
          "AU": [("Sydney", "NSW", "2000")], "NL": [("Amsterdam", None, "1012 JS")]}
TLDS = [".com", ".io", ".co", ".net", ".de", ".co.uk", ".fr", ".ai"]
STREETS = ["Market Street", "Main St", "High Street", "Hauptstraße", "Rue de Rivoli", "Baker Street"]

def new_guid(rng):
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))

def slug(s):
    return re.sub(r"[^a-z0-9]+", "", s.lower()) or "co"

def revenue(rng):
    if rng.random() < 0.03:  # beyond f64 precision
        return Decimal(rng.randint(10 ** 17, 10 ** 19)) / 100
    return (Decimal(rng.randint(10_000_00, 500_000_000_000_00)) / 100).quantize(Decimal("0.01"))

def make_company(rng, tenant, owners, taken, created):
    """Build a realistic record; `taken` is the set of lowercase domains already used."""
    name = rng.choice(EXOTIC) if rng.random() < 0.04 else "%s %s" % (rng.choice(PREFIX), rng.choice(SUFFIX))
    if rng.random() < 0.3:
        name += " " + rng.choice(["Inc.", "LLC", "Ltd", "plc", "Co.", "International"])
    domain = None
    if rng.random() > 0.06:
        base = slug(name.split(" ")[0]) + (slug(name.split(" ")[1]) if " " in name and rng.random() < 0.5 else "")
        tld, i = rng.choice(TLDS), 1
        domain = base + tld
        while domain.lower() in taken:
            i += 1
            domain = "%s%d%s" % (base, i, tld)
        if rng.random() < 0.08:
            domain = domain.capitalize()  # mixed case, to exercise case-insensitive matching
        taken.add(domain.lower())
    country = rng.choice(list(PLACES))
    city, state, postal = rng.choice(PLACES[country])

    def maybe(v, p=0.15):
        return None if rng.random() < p else v
    ind = rng.choice(INDUSTRIES)
    return {
        "id": new_guid(rng), "tenantId": tenant, "name": name, "domain": domain,
        "industry": maybe(ind),
        "description": maybe(rng.choice(["%s company" % ind, "Leading provider of %s services.\nFounded %d." %
                                          (ind.lower(), rng.randint(1950, 2022)), "Says \"hello\" & <b>bold</b>"]), 0.3),
        "employeeCount": maybe(rng.choice([rng.randint(1, 50), rng.randint(50, 5000), rng.randint(5000, 300000)])),
        "annualRevenue": maybe(revenue(rng), 0.2),
        "phone": maybe("+%d-555-%04d" % (rng.choice([1, 44, 49, 33, 81]), rng.randint(0, 9999))),
        "website": ("https://www." + domain.lower()) if domain and rng.random() < 0.85 else None,
        "linkedInUrl": maybe("https://linkedin.com/company/" + slug(name), 0.4),
        "address": maybe("%d %s" % (rng.randint(1, 999), rng.choice(STREETS)), 0.25),
        "city": maybe(city), "state": state, "country": maybe(country, 0.05), "postalCode": maybe(postal, 0.25),
        "tags": rng.sample(["enterprise", "smb", "partner", "prospect", "customer", "churned", "vip"], rng.randint(0, 3)),
        "notes": maybe("Met at conference %d" % rng.randint(2019, 2025), 0.7),
        "ownerId": maybe(rng.choice(owners), 0.2), "createdAt": created, "updatedAt": created,
    }

# ----------------------------------------------------------------------------- store
class Store:
    def __init__(self, n, seed):
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self.tenant = new_guid(random.Random("tenant-%s" % seed))
        self.owners = [new_guid(self.rng) for _ in range(6)]
        self.companies, self.by_domain, self._order = {}, {}, None
        taken, now = set(), utcnow()
        block = min(150, n // 4) if n >= 40 else 0
        block_ts = now - timedelta(days=200, microseconds=self.rng.randint(0, 999999))
        for i in range(n):
            if i < block:
                created = updated = block_ts
            else:
                created = now - timedelta(seconds=self.rng.randint(3600, 730 * 86400), microseconds=self.rng.randint(0, 999999))
                updated = created if self.rng.random() < 0.3 else created + (now - created) * self.rng.random()
            c = make_company(self.rng, self.tenant, self.owners, taken, created)
            c["updatedAt"] = updated
            self._insert(c)

    def _insert(self, c):
        self.companies[c["id"]] = c
        if c["domain"]:
            self.by_domain[c["domain"].lower()] = c["id"]
        self._order = None

    def ordered(self):
        with self.lock:
            if self._order is None:
                self._order = sorted(self.companies.values(), key=lambda c: (c["createdAt"], c["id"]))
            return self._order

    def get(self, cid):
        c = self.companies.get(str(cid).lower()) if GUID_RE.match(str(cid)) else None
        if c is None:
            raise ApiError(404, "Company not found")
        return c

    def _check_domain(self, domain, own_id):
        if domain:
            other = self.by_domain.get(domain.lower())
            if other is not None and other != own_id:
                raise ApiError(409, "A company with domain '%s' already exists" % domain)

    def create(self, clean, now):
        with self.lock:
            self._check_domain(clean.get("domain"), None)
            c = {f: None for f in FIELDS}
            c.update(id=new_guid(self.rng), tenantId=self.tenant, tags=[], createdAt=now, updatedAt=now)
            c.update(clean)
            self._insert(c)
            return c

    def update(self, cid, clean, now):
        with self.lock:
            c = self.get(cid)
            if "domain" in clean:
                self._check_domain(clean["domain"], c["id"])
                if c["domain"]:
                    self.by_domain.pop(c["domain"].lower(), None)
                if clean["domain"]:
                    self.by_domain[clean["domain"].lower()] = c["id"]
            c.update(clean)
            c["updatedAt"] = now
            return c

    def delete(self, cid):
        with self.lock:
            c = self.get(cid)
            del self.companies[c["id"]]
            if c["domain"]:
                self.by_domain.pop(c["domain"].lower(), None)
            self._order = None
            return c

    def upsert(self, clean, now):
        with self.lock:
            cid = self.by_domain.get(clean["domain"].lower()) if clean.get("domain") else None
            if cid:
                return "updated", self.update(cid, clean, now)
            return "created", self.create(clean, now)

# ----------------------------------------------------------------------------- limiter / stats
class Stats:
    def __init__(self, rps):
        self.lock = threading.Lock()
        self.rps = rps
        self.reset()

    def reset(self):
        with self.lock:
            self.accepted, self.arrivals = deque(), deque()
            self.requests = self.rate_limited = self.max_window = self.faults = self.mutations = 0
            self.by_endpoint = {}

    def hit(self, endpoint):
        """Record an API request; return None if allowed, else Retry-After seconds."""
        now = time.monotonic()
        with self.lock:
            self.requests += 1
            self.by_endpoint[endpoint] = self.by_endpoint.get(endpoint, 0) + 1
            self.arrivals.append(now)
            while self.arrivals[0] <= now - 1.0:
                self.arrivals.popleft()
            self.max_window = max(self.max_window, len(self.arrivals))
            if self.rps <= 0:
                return None
            while self.accepted and self.accepted[0] <= now - 1.0:
                self.accepted.popleft()
            if len(self.accepted) >= self.rps:
                self.rate_limited += 1
                return max(1, math.ceil(self.accepted[0] + 1.0 - now))
            self.accepted.append(now)
            return None

    def snapshot(self):
        with self.lock:
            return {"requests": self.requests, "rate_limited": self.rate_limited,
                    "by_endpoint": dict(self.by_endpoint), "max_requests_in_any_1s_window": self.max_window,
                    "faults_injected": self.faults, "mutations": self.mutations}

class Faults:
    KINDS = ["500", "503", "drop", "malformed"]

    def __init__(self, seed):
        self.lock, self.rate, self.kinds, self.rng = threading.Lock(), 0.0, list(self.KINDS), random.Random("faults-%s" % seed)

    def pick(self):
        with self.lock:
            if self.rate <= 0 or self.rng.random() >= self.rate:
                return None, False
            return self.rng.choice(self.kinds), self.rng.random() < 0.5

# ----------------------------------------------------------------------------- HTTP
def endpoint_key(method, parts):
    if parts[:3] == ["api", "v1", "companies"]:
        if len(parts) == 3:
            return "%s /api/v1/companies" % method
        if len(parts) == 4:
            tail = parts[3] if parts[3] in ("upsert", "bulk") else "{id}"
            return "%s /api/v1/companies/%s" % (method, tail)
    return "%s (unknown)" % method

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "RallyMock/1.0"
    store = stats = faults = None
    api_key = ""
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    do_GET = lambda self: self.dispatch("GET")
    do_POST = lambda self: self.dispatch("POST")
    do_PUT = lambda self: self.dispatch("PUT")
    do_DELETE = lambda self: self.dispatch("DELETE")
    do_PATCH = lambda self: self.dispatch("PATCH")

    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def send_json(self, status, obj, headers=None, malformed=False):
        body = b"" if obj is None else enc(obj).encode("utf-8")
        if malformed and body:
            body = body[: max(1, len(body) // 2)]
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def drop(self):
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def dispatch(self, method):
        try:
            url = urlsplit(self.path)
            parts = [p for p in url.path.split("/") if p]
            raw = self.read_body()
            if parts and parts[0] == "__admin":
                return self.admin(method, parts[1:], raw)
            ep = endpoint_key(method, parts)
            retry = self.stats.hit(ep)
            if retry is not None:
                return self.send_json(429, {"error": "Rate limit exceeded. Retry after %d second(s)." % retry},
                                      {"Retry-After": retry})
            if self.headers.get("X-Api-Key") != self.api_key:
                return self.send_json(401, {"error": "Missing or invalid API key"})
            kind, early = self.faults.pick()
            if kind:
                with self.stats.lock:
                    self.stats.faults += 1
            if kind == "500":
                return self.send_json(500, {"error": "Internal server error"})
            if kind == "503":
                return self.send_json(503, {"error": "Service temporarily unavailable"}, {"Retry-After": 1})
            if kind == "drop" and early:
                return self.drop()
            try:
                status, obj, hdrs = self.route(method, parts, url.query, raw)
            except ApiError as e:
                status, obj, hdrs = e.status, {"error": e.msg}, {}
            if kind == "drop":
                return self.drop()
            self.send_json(status, obj, hdrs, malformed=(kind == "malformed"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a real server answers 500 rather than hanging
            try:
                self.send_json(500, {"error": "Internal server error: %s" % type(e).__name__})
            except OSError:
                self.close_connection = True

    def json_body(self, raw):
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise ApiError(415, "Content-Type must be application/json")
        if not raw.strip():
            raise ApiError(400, "Request body is required")
        return parse_json(raw)

    def route(self, method, parts, query, raw):
        if parts[:3] != ["api", "v1", "companies"] or len(parts) > 4:
            raise ApiError(404, "Not found")
        s = self.store
        if len(parts) == 3:
            if method == "GET":
                return 200, self.list_companies(query), {}
            if method == "POST":
                c = s.create(validate(self.json_body(raw), True), utcnow())
                return 201, dict(c), {"Location": "/api/v1/companies/" + c["id"]}
            raise ApiError(405, "Method not allowed")
        tail = parts[3]
        if tail == "upsert":
            if method != "PUT":
                raise ApiError(405, "Method not allowed")
            clean = validate(self.json_body(raw), True)
            if not clean.get("domain"):
                raise ApiError(400, "Domain is required for upsert")
            action, c = s.upsert(clean, utcnow())
            return 200, {"action": action, "id": c["id"]}, {}
        if tail == "bulk":
            if method != "POST":
                raise ApiError(405, "Method not allowed")
            return 200, self.bulk(self.json_body(raw)), {}
        if method == "GET":
            with s.lock:
                return 200, dict(s.get(tail)), {}
        if method == "PUT":
            body = self.json_body(raw)
            with s.lock:
                s.get(tail)  # 404 before 400 for an unknown id
                return 200, dict(s.update(tail, validate(body, False), utcnow())), {}
        if method == "DELETE":
            s.delete(tail)
            return 204, None, {}
        raise ApiError(405, "Method not allowed")

    def list_companies(self, query):
        q = {k.lower(): v for k, v in parse_qsl(query, keep_blank_values=True)}

        def intparam(name, default):
            v = q.get(name)
            if v is None or v == "":
                return default
            try:
                return int(v)
            except ValueError:
                raise ApiError(400, "'%s' must be an integer" % name)
        limit, offset = intparam("limit", 50), intparam("offset", 0)
        if limit < 1 or offset < 0:
            raise ApiError(400, "'limit' must be >= 1 and 'offset' must be >= 0")
        limit = min(limit, 100)
        since = parse_ts(q["updatedsince"]) if q.get("updatedsince") else None
        fields = ({"id"} | {FIELD_BY_LOWER[f.strip().lower()] for f in q["fields"].split(",")
                            if f.strip().lower() in FIELD_BY_LOWER}) if q.get("fields") else None
        with self.store.lock:
            rows = [c for c in self.store.ordered() if since is None or c["updatedAt"] >= since]
            page = rows[offset:offset + limit]
            return [{f: c[f] for f in FIELDS if fields is None or f in fields} for c in page]

    def bulk(self, body):
        if isinstance(body, dict):
            body = next((v for k, v in body.items() if k.lower() == "companies"), None)
        if not isinstance(body, list):
            raise ApiError(400, "Request body must be a JSON array of companies")
        if len(body) > 100:
            raise ApiError(400, "Bulk requests are limited to 100 records (got %d)" % len(body))
        res = {"created": 0, "updated": 0, "failed": 0, "createdIds": [], "errors": []}
        now = utcnow()
        with self.store.lock:
            for i, rec in enumerate(body):
                try:
                    if not isinstance(rec, dict):
                        raise ApiError(400, "Record must be a JSON object")
                    clean = validate(rec, True)
                    action, c = self.store.upsert(clean, now)
                    res[action] += 1
                    if action == "created":
                        res["createdIds"].append(c["id"])
                except ApiError as e:
                    res["failed"] += 1
                    res["errors"].append({"index": i, "error": e.msg})
        return res

    def admin(self, method, parts, raw):
        s = self.store
        try:
            if method == "GET" and parts == ["companies"]:
                with s.lock:
                    return self.send_json(200, [dict(c) for c in s.ordered()])
            if method == "DELETE" and len(parts) == 2 and parts[0] == "companies":
                s.delete(parts[1])
                return self.send_json(204, None)
            if method == "GET" and parts == ["stats"]:
                return self.send_json(200, self.stats.snapshot())
            if method == "POST" and parts == ["stats", "reset"]:
                self.stats.reset()
                return self.send_json(200, self.stats.snapshot())
            if method == "POST" and parts == ["mutate"]:
                body = parse_json(raw or b"{}")
                if not isinstance(body, dict) or "id" not in body:
                    raise ApiError(400, "Expected {\"id\": ..., \"fields\": {...}}")
                clean = validate(body.get("fields") or {}, False)
                c = s.update(body["id"], clean, utcnow())
                with self.stats.lock:
                    self.stats.mutations += 1
                return self.send_json(200, dict(c))
            if parts == ["faults"] and method in ("GET", "POST"):
                f = self.faults
                if method == "POST":
                    body = parse_json(raw or b"{}")
                    rate = body.get("rate", 0) if isinstance(body, dict) else None
                    kinds = body.get("kinds", Faults.KINDS) if isinstance(body, dict) else None
                    if isinstance(rate, bool) or not isinstance(rate, (int, Decimal)) or not 0 <= rate <= 1 \
                            or not isinstance(kinds, list) or not kinds or any(k not in Faults.KINDS for k in kinds):
                        raise ApiError(400, "Expected {\"rate\": 0..1, \"kinds\": %s}" % Faults.KINDS)
                    with f.lock:
                        f.rate, f.kinds = float(rate), list(kinds)
                return self.send_json(200, {"rate": f.rate, "kinds": f.kinds})
            raise ApiError(404, "Unknown admin endpoint")
        except ApiError as e:
            self.send_json(e.status, {"error": e.msg})

# ----------------------------------------------------------------------------- mutator
def mutator(store, stats, rate, seed):
    rng = random.Random("mutator-%s" % seed)
    while True:
        time.sleep(1.0 / rate)
        now = utcnow()
        with store.lock:
            if not store.companies:
                continue
            r = rng.random()
            if r < 0.06:
                taken = set(store.by_domain)
                store._insert(make_company(rng, store.tenant, store.owners, taken, now))
            elif r < 0.10 and len(store.companies) > 1:
                store.delete(rng.choice(list(store.companies)))
            else:
                cid = rng.choice(list(store.companies))
                if r < 0.12:
                    dom = "%s-%d.com" % (slug(store.companies[cid]["name"])[:20], rng.randint(1000, 999999))
                    if dom in store.by_domain:
                        continue
                    clean = {"domain": dom}
                else:
                    f = rng.choice(["name", "industry", "employeeCount", "annualRevenue", "phone", "city",
                                    "description", "notes", "tags", "ownerId", "website"])
                    clean = {f: {"name": lambda: store.companies[cid]["name"].split(" (")[0] + rng.choice(["", " (EMEA)", " (Renamed)"]),
                                 "industry": lambda: rng.choice(INDUSTRIES + [None]),
                                 "employeeCount": lambda: rng.choice([None, rng.randint(1, 100000)]),
                                 "annualRevenue": lambda: rng.choice([None, revenue(rng)]),
                                 "phone": lambda: "+1-555-%04d" % rng.randint(0, 9999),
                                 "city": lambda: rng.choice(["Berlin", "Austin", "Lyon", "Tokyo", None]),
                                 "description": lambda: "Updated %s" % iso(now),
                                 "notes": lambda: rng.choice([None, "Call back Tuesday", "Renewal due"]),
                                 "tags": lambda: rng.sample(["enterprise", "smb", "partner", "vip"], rng.randint(0, 2)),
                                 "ownerId": lambda: rng.choice(store.owners + [None]),
                                 "website": lambda: rng.choice([None, "https://example.org/" + str(rng.randint(1, 99))]),
                                 }[f]()}
                store.update(cid, clean, now)
        with stats.lock:
            stats.mutations += 1

def main():
    ap = argparse.ArgumentParser(description="Rally CRM Companies API mock")
    ap.add_argument("--port", type=int, default=9701)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--companies", type=int, default=250)
    ap.add_argument("--rps", type=float, default=10)
    ap.add_argument("--mutations-per-second", type=float, default=0)
    ap.add_argument("--seed", default="1")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    Handler.store, Handler.stats, Handler.faults = Store(a.companies, a.seed), Stats(a.rps), Faults(a.seed)
    Handler.api_key, Handler.verbose = a.api_key, a.verbose
    if a.mutations_per_second > 0:
        threading.Thread(target=mutator, args=(Handler.store, Handler.stats, a.mutations_per_second, a.seed),
                         daemon=True).start()
    ThreadingHTTPServer.request_queue_size = 128
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    srv.daemon_threads = True
    print("Rally mock listening on http://127.0.0.1:%d (%d companies, rps=%s, mutations/s=%s)"
          % (a.port, a.companies, a.rps, a.mutations_per_second), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass

if __name__ == "__main__":
    main()
