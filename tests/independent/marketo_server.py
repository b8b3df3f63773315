#!/usr/bin/env python3
"""Independent stand-in for the Marketo REST Companies API + OAuth identity endpoint.

Written only from /work/shared/api/{marketo-companies.txt, marketo-notes.md, pitfalls.md}, Adobe's
Swagger files and public knowledge of real Marketo.  Python 3.11 standard library only.
  python3 server.py --port 9702 --client-id ID --client-secret SECRET --companies N --first-id 1 \
      --token-ttl 3600 --mutations-per-second R --seed S  [--daily-quota 50000 --latency-ms 10 ...]
  REST base http://127.0.0.1:PORT/rest     identity http://127.0.0.1:PORT/identity/oauth/token
Admin (no auth/limits/faults): GET /__admin/companies, GET /__admin/stats, POST /__admin/mutate
  {"id", "fields"} (no id: create; "delete": true: delete), POST /__admin/faults {"rate", "kinds"},
  POST /__admin/config {daily_quota, daily_used, rate_limit, rate_window, max_concurrency,
  latency_ms, crm_sync}, POST /__admin/expire-tokens.

CHOICES WHERE THE DOCUMENTS ARE SILENT (real Marketo as far as known, otherwise defensive):
Endpoints
 - Sync = POST /rest/v1/companies.json with a JSON body (as in the document); /rest/v1/companies/
   sync.json is an alias.  POST companies.json?_method=GET + x-www-form-urlencoded body = query
   (URL and body params merged).  Also GET /rest/v1/stats/usage.json.  companies/schema/fields*
   are not served.  Unknown /rest path -> 610; known path, wrong verb -> 605; JSON POST without
   Content-Type application/json -> 612; bad JSON -> 609.  Body > 1 MiB -> HTTP 413, request-target
   > 8192 bytes -> HTTP 414 (HTML bodies, before auth, never counted).
Auth
 - No token -> 600 "Empty access token", unknown -> 601, past expiry -> 602.  The Authorization
   Bearer header wins over the access_token query/form parameter.  Identity (GET or POST, params
   in query or form body) returns the same token until it expires with expires_in counting down
   (floor seconds), then a new "<uuid>:ab" token.  Bad credentials -> HTTP 401 {"error":
   "invalid_client","error_description":"Bad client credentials"}; missing/other grant_type ->
   HTTP 400 invalid_request / unsupported_grant_type.  Identity is never limited or faulted.
Limits
 - After auth, in order: 615 (more than --max-concurrency /rest requests in flight, this one
   included), 607 (daily quota), 606 (>= --rate-limit admitted calls in the last --rate-window s).
   As in Adobe's error table, 600/601/602/606/607/615 answers are not counted in the window or
   the quota; every other answer is (1xxx/7xx errors, injected 500/503/drop/malformed too).  The
   quota resets at midnight America/Chicago (US DST rule computed by hand).  Stats "requests",
   "max_calls_in_any_20s_window", "max_concurrent_seen" count every /rest request received.
 - Every call sleeps --latency-ms (sync/delete twice) outside the data lock so that concurrent
   clients really overlap and 615 can happen.
Query
 - filterType id|externalCompanyId|company; an existing unsearchable field (updatedAt) -> 1011
   "Field 'updatedAt' not supported", unknown -> 1006.  Missing filterType/filterValues -> 701
   "<name> cannot be blank".  filterValues/fields may be repeated or comma-separated; values are
   trimmed, blanks dropped; > 300 values -> 1003; non-integer id value -> 1001.  batchSize
   non-integer -> 1001, outside 1..300 -> 1003.  Unknown name in fields -> 1006 (whole request).
 - String matching (filters, externalCompanyId dedupe) is case-insensitive like Marketo's MySQL
   collation; the stored spelling never changes.
 - Results follow filterValues order (duplicates collapsed; companies sharing a name come in id
   order); seq = index within the page; null fields are omitted ("requested but not returned is
   implied null"); id and seq always present.
 - Paging: the matching id list is snapshotted on the first call; nextPageToken (base32 with '='
   padding - URL-encode it) appears only when rows remain and maps to a fixed offset, so a page
   can be re-fetched.  The same filterType+filterValues must come with it, else 1003 "Invalid
   nextPageToken".  Rows deleted since the snapshot are dropped (a page may be short); values are
   current.  Tokens do not expire (oldest dropped beyond 20000).
Sync / delete
 - input missing/empty -> 701; > 300 -> 1003; bad action/dedupeBy/deleteBy -> 1003; dedupeBy
   idField + createOnly -> 1003 (all request-level).
 - Record reasons (all collected): unknown field 1006 "Field 'x' not found"; createdAt/updatedAt,
   an id under dedupeFields that is not the matched record's, a changed externalCompanyId under
   idField, bad type, too long (describe lengths, no silent truncation) -> 1003; missing key ->
   1003 "Value for required field '<key>' not specified"; repeated key later in the batch -> 1036;
   createOnly on existing -> 1005 "Company already exists"; updateOnly (or idField createOrUpdate)
   on missing -> 1013 "Record not found".  Skipped rows carry no id.  Numbers are stringified for
   string fields, numeric strings accepted for integer/currency, null or "" writes null.
 - An update that changes nothing answers "updated" and keeps updatedAt; otherwise updatedAt = now
   (second precision: many rows can share one timestamp).  Ids are sequential and never reused;
   a deleted company's externalCompanyId may be created again under a new id.
 - --crm-sync: sync/delete skip every record with 1018 "CRM Enabled" (read-only instance).
Faults (kinds 500, 503, drop, malformed, 602; chosen uniformly; /rest calls past auth only)
 - 500/503: HTML body, call not executed.  drop: the call IS executed, then the connection is
   closed with no answer (outcome unknown).  malformed: executed, HTTP 200 with truncated JSON.
   602: the presented token is really expired server-side (identity then issues a new one).
Data
 - The instance has exactly the describe fields (no site, billingStreet, billingPostalCode...).
   Seeded names repeat and some contain commas ("Acme, Inc."); ~5% of seeded rows share one
   bulk-import updatedAt.  Mutator: Poisson at --mutations-per-second; 92% edit 1-3 fields of a
   random company (updatedAt = now), 8% create a company; it never deletes.
"""
import argparse, base64, collections, datetime as dt, json, random, threading, time, uuid
from bisect import bisect_left
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

FIELDS = [  # name, displayName, dataType, length, updateable  (describe order)
    ("createdAt", "Created At", "datetime", None, False),
    ("externalCompanyId", "External Company Id", "string", 100, False),
    ("id", "Id", "integer", None, False),
    ("updatedAt", "Updated At", "datetime", None, False),
    ("annualRevenue", "Annual Revenue", "currency", None, True),
    ("billingCity", "Billing City", "string", 255, True),
    ("billingCountry", "Billing Country", "string", 255, True),
    ("billingState", "Billing State", "string", 255, True),
    ("company", "Company Name", "string", 255, True),
    ("industry", "Industry", "string", 255, True),
    ("mainPhone", "Main Phone", "string", 255, True),
    ("numberOfEmployees", "Num Employees", "integer", None, True),
    ("website", "Website", "url", 255, True)]
FMAP = {f[0]: f for f in FIELDS}
ORDER = ("id externalCompanyId company website industry numberOfEmployees annualRevenue billingCity "
         "billingState billingCountry mainPhone createdAt updatedAt").split()
SEARCHABLE = ("externalCompanyId", "id", "company")
DEFAULT_FIELDS = ["id", "externalCompanyId", "updatedAt", "createdAt"]
FAULT_KINDS = ["500", "503", "drop", "malformed", "602"]
MAX_BATCH, MAX_BODY, MAX_URI = 300, 1024 * 1024, 8192
P_SYNC, P_DELETE = "/rest/v1/companies/sync.json", "/rest/v1/companies/delete.json"
P_QUERY, P_DESCRIBE = "/rest/v1/companies.json", "/rest/v1/companies/describe.json"


def iso(ts):
    return dt.datetime.fromtimestamp(int(ts), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def central_day(ts):
    """Calendar day in America/Chicago (US DST: 2nd Sunday of March .. 1st Sunday of November)."""
    u = dt.datetime.fromtimestamp(ts, dt.timezone.utc)

    def sunday(month, n):
        d = dt.datetime(u.year, month, 1, tzinfo=dt.timezone.utc)
        return d + dt.timedelta(days=(6 - d.weekday()) % 7 + 7 * (n - 1))
    dst = sunday(3, 2) + dt.timedelta(hours=8) <= u < sunday(11, 1) + dt.timedelta(hours=7)
    return (u + dt.timedelta(hours=-5 if dst else -6)).date().isoformat()


def request_id():
    return "%04x#%x" % (random.getrandbits(16), int(time.time() * 1000))


class ApiError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = str(code), message


def as_int(v):
    """int from int/float/str without fraction; raises ValueError otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(v)
    f = float(v)
    if not f.is_integer() or abs(f) > 2 ** 53:
        raise ValueError(v)
    return int(f)


# ----------------------------------------------------------------------------- seed data
PREFIX = ("Acme|Northwind|Globex|Initech|Umbrella|Stark|Wayne|Cyberdyne|Hooli|Vandelay|Wonka|Tyrell|"
          "Aperture|Blue Harbor|Pied Piper|Massive Dynamic|Oscorp|Müller|Société Nouvelle|Østfold|"
          "Tanaka|Great Lakes|Red Rock|Silverline|Evergreen|Summit|Pioneer|Lakeside|Brightwater|"
          "Ironclad|Keystone|Nordhavn|Sakura|Quantum|Atlas").split("|")
MIDDLE = ("Logistics|Software|Foods|Analytics|Energy|Holdings|Labs|Industries|Systems|Capital|Media|"
          "Health|Robotics|Textiles|").split("|")
SUFFIX = "Inc.|, Inc.|LLC|GmbH|Ltd|S.A.|Corp.||AG|K.K.|B.V.".split("|")
INDUSTRIES = ("Agriculture|Banking|Biotechnology|Chemicals|Communications|Construction|Consulting|"
              "Education|Electronics|Energy|Engineering|Entertainment|Finance|Food & Beverage|"
              "Government|Healthcare|Hospitality|Insurance|Machinery|Manufacturing|Media|"
              "Not For Profit|Retail|Shipping|Technology|Telecommunications|Transportation|"
              "Utilities|Other").split("|")
PLACES = [tuple(x or None for x in p.split("/")) for p in (
    "San Francisco/CA/United States|Austin/TX/United States|Chicago/IL/United States|"
    "New York/NY/United States|Seattle/WA/United States|Boston/MA/United States|Toronto/ON/Canada|"
    "London//United Kingdom|München/Bayern/Germany|Paris//France|Oslo//Norway|Tokyo//Japan|"
    "São Paulo/SP/Brazil|Sydney/NSW/Australia|Zürich//Switzerland|Bengaluru/Karnataka/India"
).split("|")]
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def gen_name(r):
    name, suf = " ".join(p for p in (r.choice(PREFIX), r.choice(MIDDLE)) if p), r.choice(SUFFIX)
    return name + suf if suf.startswith(",") else (name + " " + suf).strip()


def gen_fields(r, name):
    city, state, country = r.choice(PLACES)
    slug = "".join(c for c in name.lower() if c.isascii() and c.isalnum())[:24] or "example"
    emp = int(10 ** r.uniform(0.5, 5.3))

    def maybe(v, p=0.12):
        return None if r.random() < p else v
    return {"company": name,
            "website": maybe("https://www.%s.%s" % (slug, r.choice(["com", "io", "net", "de"]))),
            "industry": maybe(r.choice(INDUSTRIES)), "numberOfEmployees": maybe(emp),
            "annualRevenue": maybe(float(round(emp * r.uniform(40000, 400000), -3))),
            "billingCity": maybe(city, 0.05), "billingState": state,
            "billingCountry": maybe(country, 0.05),
            "mainPhone": maybe("+1 (%03d) 555-%04d" % (r.randint(201, 989), r.randint(0, 9999)), 0.2)}


# ----------------------------------------------------------------------------- state
class State:
    def __init__(self, a):
        self.a, self.lock = a, threading.RLock()
        self.rng, self.fault_rng = random.Random(a.seed), random.Random(a.seed + 2)
        self.recs, self.ext_idx, self.live, self.next_id = {}, {}, [], a.first_id
        self.tokens, self.current, self.pages = {}, None, collections.OrderedDict()
        self.fault_rate, self.fault_kinds = a.fault_rate, list(FAULT_KINDS)
        self.window, self.arrivals, self.inflight = collections.deque(), collections.deque(), 0
        self.day, self.daily_used = central_day(time.time()), 0
        self.stats = dict(requests=0, rate_limited_606=0, concurrency_615=0, quota_607=0,
                          max_calls_in_any_20s_window=0, max_concurrent_seen=0, admitted=0,
                          auth_errors=0, identity_requests=0, tokens_issued=0, faults_injected=0,
                          mutations=0, deleted=0, http_413=0, http_414=0)
        self.seed(a.companies)

    def new_ext(self, r):
        while True:
            ext = ("0015" + "".join(r.choice(ALNUM) for _ in range(14)) if r.random() < 0.7
                   else "CUST-%06d" % r.randint(0, 999999))
            if ext.lower() not in self.ext_idx:
                return ext

    def insert(self, ext, fields, created, updated):
        cid, self.next_id = self.next_id, self.next_id + 1
        rec = dict.fromkeys(ORDER)
        rec.update(fields)
        rec.update(id=cid, externalCompanyId=ext, createdAt=int(created), updatedAt=int(updated))
        self.recs[cid], self.ext_idx[ext.lower()] = rec, cid
        self.live.append(cid)
        return rec

    def remove(self, cid):
        rec = self.recs.pop(cid)
        self.ext_idx.pop(rec["externalCompanyId"].lower(), None)
        del self.live[bisect_left(self.live, cid)]
        self.stats["deleted"] += 1

    def touch(self, rec, values):
        if any(rec.get(k) != v for k, v in values.items()):
            rec.update(values)
            rec["updatedAt"] = max(int(time.time()), rec["updatedAt"])

    def seed(self, n):
        r, now = self.rng, int(time.time())
        import_ts = now - r.randint(86400 * 30, 86400 * 200)
        for _ in range(n):
            created, x = now - r.randint(3600, 86400 * 1000), r.random()
            updated = (import_ts if x < 0.05 and created < import_ts else created if x < 0.25
                       else r.randint(created, now - 1))
            self.insert(self.new_ext(r), gen_fields(r, gen_name(r)), created, updated)

    def public(self, rec, fields=None, seq=None):
        out = {} if seq is None else {"seq": seq}
        if fields is not None:
            out["id"] = rec["id"]
        for k in fields or ORDER:
            v = rec.get(k)
            v = iso(v) if v is not None and k in ("createdAt", "updatedAt") else v
            if fields is None or v is not None:
                out[k] = v
        return out

    def issue_token(self):
        now = time.time()
        with self.lock:
            if not (self.current and self.tokens[self.current] - now >= 1):
                self.current = "%s:ab" % uuid.UUID(int=self.rng.getrandbits(128), version=4)
                self.tokens[self.current] = now + self.a.token_ttl
                self.stats["tokens_issued"] += 1
            return self.current, int(self.tokens[self.current] - now)

    def arrive(self):
        now = time.time()
        with self.lock:
            s = self.stats
            s["requests"] += 1
            self.inflight += 1
            s["max_concurrent_seen"] = max(s["max_concurrent_seen"], self.inflight)
            self.arrivals.append(now)
            while self.arrivals[0] <= now - 20:
                self.arrivals.popleft()
            s["max_calls_in_any_20s_window"] = max(s["max_calls_in_any_20s_window"], len(self.arrivals))

    def admit(self):
        now, a = time.time(), self.a
        with self.lock:
            if central_day(now) != self.day:
                self.day, self.daily_used = central_day(now), 0
            while self.window and self.window[0] <= now - a.rate_window:
                self.window.popleft()
            if self.inflight > a.max_concurrency:
                self.stats["concurrency_615"] += 1
                raise ApiError(615, "Concurrent access limit reached")
            if self.daily_used >= a.daily_quota:
                self.stats["quota_607"] += 1
                raise ApiError(607, "Daily quota reached")
            if len(self.window) >= a.rate_limit:
                self.stats["rate_limited_606"] += 1
                raise ApiError(606, "Max rate limit '%d' exceeded with in '%d' secs"
                               % (a.rate_limit, a.rate_window))
            self.window.append(now)
            self.daily_used += 1
            self.stats["admitted"] += 1

    def pick_fault(self):
        with self.lock:
            if self.fault_rate > 0 and self.fault_rng.random() < self.fault_rate:
                self.stats["faults_injected"] += 1
                return self.fault_rng.choice(self.fault_kinds)
        return None


# ----------------------------------------------------------------------------- API logic
def coerce(name, value):
    """Validate a value for a field; returns (ok, value or reason message)."""
    _, _, dtype, length, _ = FMAP[name]
    if value is None or value == "":
        return True, None
    try:
        if dtype in ("string", "url"):
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError
            if length and len(str(value)) > length:
                return False, "Value for field '%s' exceeds max length %d" % (name, length)
            return True, str(value)
        if dtype == "integer":
            v = as_int(value)
            if abs(v) > 2 ** 31 - 1:
                raise ValueError
            return True, v
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        f = float(value)
        if f != f or abs(f) > 1e15:
            raise ValueError
        return True, f
    except (ValueError, TypeError):
        return False, "Invalid value '%s' for field '%s'. Required of type '%s'" % (value, name, dtype)


def multi(params, name):
    return [x.strip() for v in params.get(name, []) for x in v.split(",") if x.strip()]


def first(params, name):
    v = params.get(name)
    return v[0] if v else None


def api_query(st, params):
    ft = (first(params, "filterType") or "").strip()
    if not ft:
        raise ApiError(701, "filterType cannot be blank")
    if ft not in SEARCHABLE:
        raise ApiError(1011, "Field '%s' not supported" % ft) if ft in FMAP else \
            ApiError(1006, "Field '%s' not found" % ft)
    values = multi(params, "filterValues")
    if not values:
        raise ApiError(701, "filterValues cannot be blank")
    if len(values) > MAX_BATCH:
        raise ApiError(1003, "Number of filterValues exceeds the limit of %d" % MAX_BATCH)
    fields = list(dict.fromkeys(multi(params, "fields") or DEFAULT_FIELDS))
    for f in fields:
        if f not in FMAP:
            raise ApiError(1006, "Field '%s' not found" % f)
    bs = first(params, "batchSize")
    try:
        bs = MAX_BATCH if bs in (None, "") else int(bs)
        if ft == "id":
            [int(v) for v in values]
    except ValueError as e:
        raise ApiError(1001, "Invalid value '%s'. Required of type 'Integer'"
                       % str(e).split(": ", 1)[-1].strip("'"))
    if not 1 <= bs <= MAX_BATCH:
        raise ApiError(1003, "batchSize must be between 1 and %d" % MAX_BATCH)
    key, token = (ft, tuple(v.lower() for v in values)), first(params, "nextPageToken")
    with st.lock:
        if token:
            page = st.pages.get(token)
            if page is None or page[0] != key:
                raise ApiError(1003, "Invalid nextPageToken")
            _, ids, off = page
        else:
            ids, off = [], 0
            for v in key[1]:
                if ft == "id":
                    hits = [int(v)] if int(v) in st.recs else []
                elif ft == "externalCompanyId":
                    hits = [st.ext_idx[v]] if v in st.ext_idx else []
                else:
                    hits = [c for c in st.live if (st.recs[c]["company"] or "").lower() == v]
                ids += [h for h in hits if h not in ids]
        chunk = [c for c in ids[off:off + bs] if c in st.recs]
        out = {"result": [st.public(st.recs[c], fields, i) for i, c in enumerate(chunk)]}
        if off + bs < len(ids):
            nt = base64.b32encode(st.rng.getrandbits(128).to_bytes(16, "big")).decode()
            st.pages[nt] = (key, ids, off + bs)
            while len(st.pages) > 20000:
                st.pages.popitem(last=False)
            out["nextPageToken"] = nt
        return out


def check_batch(body, key):
    inp, mode = body.get("input"), body.get(key) or "dedupeFields"
    if not isinstance(inp, list) or not inp:
        raise ApiError(701, "input cannot be blank")
    if len(inp) > MAX_BATCH:
        raise ApiError(1003, "Input exceeds the max batch size of %d" % MAX_BATCH)
    if mode not in ("dedupeFields", "idField"):
        raise ApiError(1003, "Invalid %s '%s'" % (key, mode))
    return inp, mode


def skipped(seq, *reasons):
    return {"seq": seq, "status": "skipped",
            "reasons": [{"code": str(c), "message": m} for c, m in reasons]}


def lookup(st, rec, mode):
    """Returns (dedupe key, existing id or None, reason or None)."""
    name = "id" if mode == "idField" else "externalCompanyId"
    raw = rec.get(name)
    if raw is None or raw == "":
        return None, None, (1003, "Value for required field '%s' not specified" % name)
    if mode == "idField":
        try:
            cid = as_int(raw)
        except (ValueError, TypeError):
            return None, None, (1001, "Invalid value '%s'. Required of type 'Integer'" % raw)
        return ("id", cid), (cid if cid in st.recs else None), None
    ok, ext = coerce("externalCompanyId", raw)
    if not ok or isinstance(raw, float):
        return None, None, (1003, ext if not ok else "Invalid value for field 'externalCompanyId'")
    return ("ext", ext.lower()), st.ext_idx.get(ext.lower()), None


def api_sync(st, body):
    action = body.get("action") or "createOrUpdate"
    if action not in ("createOnly", "updateOnly", "createOrUpdate"):
        raise ApiError(1003, "Invalid action '%s'" % action)
    inp, mode = check_batch(body, "dedupeBy")
    if mode == "idField" and action == "createOnly":
        raise ApiError(1003, "dedupeBy 'idField' is not allowed with action 'createOnly'")
    out, seen = [], set()
    with st.lock:
        for seq, rec in enumerate(inp):
            if st.a.crm_sync or not isinstance(rec, dict):
                out.append(skipped(seq, (1018, "CRM Enabled") if st.a.crm_sync else (1003, "Invalid data")))
                continue
            key, cid, why = lookup(st, rec, mode)
            reasons, values = [why] if why else [], {}
            for k, v in rec.items():
                if k not in FMAP:
                    reasons.append((1006, "Field '%s' not found" % k))
                elif k in ("createdAt", "updatedAt"):
                    reasons.append((1003, "Field '%s' is not updateable" % k))
                elif k == "id":
                    if mode == "dedupeFields" and (action == "createOnly" or cid is None or str(v) != str(cid)):
                        reasons.append((1003, "Invalid data: field 'id' cannot be set"))
                elif k == "externalCompanyId":
                    if mode == "idField" and cid is not None and v not in (None, "") and \
                            str(v).lower() != st.recs[cid]["externalCompanyId"].lower():
                        reasons.append((1003, "Field 'externalCompanyId' is not updateable"))
                else:
                    ok, val = coerce(k, v)
                    values[k] = val
                    if not ok:
                        reasons.append((1003, val))
            if not reasons and key in seen:
                reasons.append((1036, "Duplicate object found in input"))
            seen.add(key)
            if not reasons and cid is not None and action == "createOnly":
                reasons.append((1005, "Company already exists"))
            if not reasons and cid is None and (action == "updateOnly" or mode == "idField"):
                reasons.append((1013, "Record not found"))
            if reasons:
                out.append(skipped(seq, *reasons))
            elif cid is None:
                now = int(time.time())
                new = st.insert(str(rec["externalCompanyId"]), values, now, now)
                out.append({"seq": seq, "id": new["id"], "status": "created"})
            else:
                st.touch(st.recs[cid], values)
                out.append({"seq": seq, "id": cid, "status": "updated"})
    return {"result": out}


def api_delete(st, body):
    inp, mode = check_batch(body, "deleteBy")
    out = []
    with st.lock:
        for seq, rec in enumerate(inp):
            if st.a.crm_sync or not isinstance(rec, dict):
                out.append(skipped(seq, (1018, "CRM Enabled") if st.a.crm_sync else (1003, "Invalid data")))
                continue
            _, cid, why = lookup(st, rec, mode)
            if why or cid is None:
                out.append(skipped(seq, why or (1013, "Record not found")))
            else:
                st.remove(cid)
                out.append({"seq": seq, "id": cid, "status": "deleted"})
    return {"result": out}


def describe():
    fields = [dict({"name": n, "displayName": d, "dataType": t}, **({"length": ln} if ln else {}),
                   updateable=u) for n, d, t, ln, u in FIELDS]
    return {"result": [{"name": "Company", "displayName": "Company", "description": "Company object",
                        "createdAt": "2015-05-11T17:11:32Z", "updatedAt": "2015-05-11T17:11:32Z",
                        "idField": "id", "dedupeFields": ["externalCompanyId"],
                        "searchableFields": [[s] for s in SEARCHABLE], "fields": fields}]}


# ----------------------------------------------------------------------------- HTTP layer
class Handler(BaseHTTPRequestHandler):
    protocol_version, server_version, sys_version = "HTTP/1.1", "Apache", ""

    def log_message(self, fmt, *args):
        if self.server.state.a.verbose:
            super().log_message(fmt, *args)

    def send_raw(self, code, body, ctype="application/json;charset=UTF-8", close=False):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, code, obj):
        self.send_raw(code, json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def send_html(self, code, reason):
        body = "<html><head><title>%d %s</title></head><body><h1>%s</h1></body></html>" % (code, reason, reason)
        self.send_raw(code, body.encode(), "text/html", close=code in (413, 414))

    @staticmethod
    def marketo(payload=None, error=None):
        if error:
            return {"requestId": request_id(), "success": False,
                    "errors": [{"code": error.code, "message": error.message}]}
        return dict({"requestId": request_id()}, **payload, success=True)

    def dispatch(self, method):
        st = self.server.state
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        for bad, code, reason in ((len(self.path.encode()) > MAX_URI, 414, "Request-URI Too Long"),
                                  (length > MAX_BODY, 413, "Request Entity Too Large")):
            if bad:
                with st.lock:
                    st.stats["http_%d" % code] += 1
                return self.send_html(code, reason)
        body = self.rfile.read(length) if length > 0 else b""
        u = urlsplit(self.path)
        params = parse_qs(u.query, keep_blank_values=True)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        form = {}
        if method == "POST" and ctype == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        path = u.path.rstrip("/") or "/"
        if path.startswith("/__admin"):
            return self.admin(st, method, path, body)
        if path == "/identity/oauth/token":
            return self.identity(st, method, {**params, **form})
        if path.startswith("/rest/"):
            st.arrive()
            try:
                return self.rest(st, method, path, params, form, ctype, body)
            finally:
                with st.lock:
                    st.inflight -= 1
        self.send_html(404, "Not Found")

    def identity(self, st, method, p):
        with st.lock:
            st.stats["identity_requests"] += 1
        gt = first(p, "grant_type")
        if method not in ("GET", "POST"):
            err = (405, "method_not_allowed", "Request method '%s' not supported" % method)
        elif not gt:
            err = (400, "invalid_request", "Missing grant type")
        elif gt != "client_credentials":
            err = (400, "unsupported_grant_type", "Unsupported grant type: " + gt)
        elif first(p, "client_id") != st.a.client_id or first(p, "client_secret") != st.a.client_secret:
            err = (401, "invalid_client", "Bad client credentials")
        else:
            tok, left = st.issue_token()
            return self.send_json(200, {"access_token": tok, "token_type": "bearer", "expires_in": left,
                                        "scope": "apis@%s" % st.a.client_id})
        self.send_json(err[0], {"error": err[1], "error_description": err[2]})

    def rest(self, st, method, path, params, form, ctype, body):
        allp = {**params, **form}
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else first(allp, "access_token")
        fault = None
        try:
            with st.lock:
                exp = st.tokens.get(token)
            if not token:
                raise ApiError(600, "Empty access token")
            if exp is None:
                raise ApiError(601, "Access token invalid")
            if exp <= time.time():
                raise ApiError(602, "Access token expired")
            fault = st.pick_fault()
            if fault == "602":
                with st.lock:
                    st.tokens[token] = min(st.tokens[token], time.time() - 1)
                raise ApiError(602, "Access token expired")
        except ApiError as e:
            with st.lock:
                st.stats["auth_errors"] += 1
            return self.send_json(200, self.marketo(error=e))
        try:
            st.admit()
        except ApiError as e:
            return self.send_json(200, self.marketo(error=e))
        tunnel = method == "POST" and first(params, "_method") == "GET"
        mutating = path in (P_SYNC, P_DELETE) or (path == P_QUERY and method == "POST" and not tunnel)
        time.sleep(st.a.latency_ms / 1000.0 * (2 if mutating else 1))
        if fault in ("500", "503"):
            return self.send_html(int(fault), "Internal Server Error" if fault == "500"
                                  else "Service Temporarily Unavailable")
        try:
            resp = self.marketo(self.route(st, "GET" if tunnel else method, path, allp, ctype, body, tunnel))
        except ApiError as e:
            resp = self.marketo(error=e)
        if fault == "drop":
            self.close_connection = True
            return
        raw = json.dumps(resp, ensure_ascii=False).encode("utf-8")
        self.send_raw(200, raw[:max(1, len(raw) // 2)] if fault == "malformed" else raw)

    @staticmethod
    def json_body(ctype, body):
        if ctype != "application/json":
            raise ApiError(612, "Invalid Content Type")
        try:
            obj = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict):
            raise ApiError(609, "Invalid JSON")
        return obj

    def route(self, st, verb, path, allp, ctype, body, tunnel):
        if tunnel and ctype != "application/x-www-form-urlencoded" and body.strip():
            raise ApiError(612, "Invalid Content Type")
        routes = {(P_QUERY, "GET"): lambda: api_query(st, allp),
                  (P_QUERY, "POST"): lambda: api_sync(st, self.json_body(ctype, body)),
                  (P_SYNC, "POST"): lambda: api_sync(st, self.json_body(ctype, body)),
                  (P_DELETE, "POST"): lambda: api_delete(st, self.json_body(ctype, body)),
                  (P_DESCRIBE, "GET"): describe,
                  ("/rest/v1/stats/usage.json", "GET"): lambda: {"result": [
                      {"date": st.day, "total": st.daily_used,
                       "users": [{"userId": "apis@%s" % st.a.client_id, "count": st.daily_used}]}]}}
        if (path, verb) in routes:
            return routes[(path, verb)]()
        if any(p == path for p, _ in routes):
            raise ApiError(605, "HTTP Method not supported")
        raise ApiError(610, "Requested resource not found")

    # -- admin: no auth, no limits, no faults
    def admin(self, st, method, path, body):
        try:
            data = json.loads(body.decode("utf-8")) if body.strip() else {}
        except ValueError:
            return self.send_json(400, {"error": "invalid JSON"})
        if not isinstance(data, dict):
            return self.send_json(400, {"error": "expected a JSON object"})
        with st.lock:
            if (method, path) == ("GET", "/__admin/companies"):
                return self.send_json(200, [st.public(st.recs[c]) for c in st.live])
            if (method, path) == ("GET", "/__admin/stats"):
                return self.send_json(200, dict(st.stats, daily_used=st.daily_used, inflight=st.inflight,
                                                daily_quota=st.a.daily_quota, companies=len(st.recs),
                                                next_id=st.next_id, fault_rate=st.fault_rate))
            if (method, path) == ("POST", "/__admin/faults"):
                kinds = data.get("kinds") or st.fault_kinds
                try:
                    rate = max(0.0, min(1.0, float(data.get("rate", 0))))
                    assert all(k in FAULT_KINDS for k in kinds)
                except (TypeError, ValueError, AssertionError):
                    return self.send_json(400, {"error": "rate: number 0..1, kinds: subset of %s" % FAULT_KINDS})
                st.fault_rate, st.fault_kinds = rate, list(kinds)
                return self.send_json(200, {"rate": st.fault_rate, "kinds": st.fault_kinds})
            if (method, path) == ("POST", "/__admin/config"):
                for k in ("daily_quota", "rate_limit", "rate_window", "max_concurrency", "latency_ms"):
                    if k in data:
                        setattr(st.a, k, int(data[k]))
                st.a.crm_sync = bool(data.get("crm_sync", st.a.crm_sync))
                st.daily_used = int(data.get("daily_used", st.daily_used))
                return self.send_json(200, {k: getattr(st.a, k) for k in (
                    "daily_quota", "rate_limit", "rate_window", "max_concurrency", "latency_ms", "crm_sync")})
            if (method, path) == ("POST", "/__admin/expire-tokens"):
                for t in st.tokens:
                    st.tokens[t] = min(st.tokens[t], time.time() - 1)
                return self.send_json(200, {"expired": len(st.tokens)})
            if (method, path) == ("POST", "/__admin/mutate"):
                return self.admin_mutate(st, data)
        self.send_json(404, {"error": "unknown admin endpoint"})

    def admin_mutate(self, st, data):
        fields, cid = data.get("fields") or {}, data.get("id")
        try:
            cid = None if cid is None else as_int(cid)
            assert isinstance(fields, dict)
        except (TypeError, ValueError, AssertionError):
            return self.send_json(400, {"error": "expected {\"id\": int, \"fields\": {...}}"})
        if cid is not None and cid not in st.recs:
            return self.send_json(404, {"error": "company %s not found" % cid})
        if data.get("delete") and cid is not None:
            st.remove(cid)
            return self.send_json(200, {"deleted": cid})
        values, errors = {}, []
        for k, v in fields.items():
            if k == "externalCompanyId" and cid is None:
                continue
            ok, val = coerce(k, v) if k in FMAP and FMAP[k][4] else (False, "field '%s' not editable" % k)
            values[k] = val
            if not ok:
                errors.append(val)
        if errors:
            return self.send_json(400, {"errors": errors})
        if cid is None:
            ext = str(fields.get("externalCompanyId") or st.new_ext(st.rng))
            if ext.lower() in st.ext_idx:
                return self.send_json(409, {"error": "externalCompanyId exists"})
            rec = st.insert(ext, values, time.time(), time.time())
        else:
            rec = st.recs[cid]
            st.touch(rec, values)
        st.stats["mutations"] += 1
        return self.send_json(200, st.public(rec))


for _verb in ("GET", "POST", "PUT", "DELETE", "PATCH"):
    setattr(Handler, "do_" + _verb, lambda self, v=_verb: self.dispatch(v))


class Server(ThreadingHTTPServer):
    daemon_threads, request_queue_size = True, 128


def mutator(st, rate):
    r = random.Random(st.a.seed + 1)
    editable = ["website", "industry", "numberOfEmployees", "annualRevenue", "billingCity",
                "billingState", "billingCountry", "mainPhone", "company"]
    while True:
        time.sleep(r.expovariate(rate))
        with st.lock:
            fresh = gen_fields(r, gen_name(r))
            if r.random() < 0.08 or not st.live:
                st.insert(st.new_ext(r), fresh, time.time(), time.time())
            else:
                ks = [k for k in r.sample(editable, r.randint(1, 3)) if k != "company" or r.random() < 0.3]
                st.touch(st.recs[r.choice(st.live)], {k: fresh[k] for k in ks or ["mainPhone"]})
            st.stats["mutations"] += 1


def main():
    p = argparse.ArgumentParser(description="Independent Marketo Companies REST API stand-in")
    for name, typ, default in (("host", str, "127.0.0.1"), ("port", int, 9702),
                               ("client-id", str, "test-client"), ("client-secret", str, "test-secret"),
                               ("companies", int, 1000), ("first-id", int, 1), ("token-ttl", float, 3600),
                               ("mutations-per-second", float, 0.0), ("seed", int, 42),
                               ("daily-quota", int, 50000), ("rate-limit", int, 100), ("rate-window", int, 20),
                               ("max-concurrency", int, 10), ("latency-ms", int, 10), ("fault-rate", float, 0.0)):
        p.add_argument("--" + name, type=typ, default=default)
    p.add_argument("--crm-sync", action="store_true", help="companies API read-only (1018)")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    random.seed(a.seed + 3)
    st = State(a)
    srv = Server((a.host, a.port), Handler)
    srv.state = st
    if a.mutations_per_second > 0:
        threading.Thread(target=mutator, args=(st, a.mutations_per_second), daemon=True).start()
    print("marketo stand-in: http://%s:%d/rest, identity /identity/oauth/token, %d companies (ids %d..%d)"
          % (a.host, a.port, len(st.recs), a.first_id, st.next_id - 1), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
