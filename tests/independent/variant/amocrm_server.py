#!/usr/bin/env python3
"""Independent mock of the amoCRM API v4 Companies endpoints (+ OAuth 2.0).

Written only from the vendor documents in /work/shared/api/ (amocrm-companies.txt,
amocrm-notes.md, pitfalls.md, README.md) and general knowledge of the real vendor.
Standard library only.  Black-box test target for a sync daemon.

Start:
    python3 amocrm_server.py --port 9703 --client-id aid --client-secret asecret \
        --refresh-token rt0 --long-lived-token llt --companies N --rps 7 \
        --token-ttl 86400 --mutations-per-second 0 --seed 3

SPEC (every behavioural choice, numbered)
=========================================

Transport
 1. Binds 127.0.0.1 only; ThreadingHTTPServer; HTTP/1.1 keep-alive; every response carries
    Content-Length (0 for 204/429).  Request bodies may be Content-Length or chunked.
 2. One log line per request on stderr: "METHOD /path?query STATUS" ("drop" for a dropped
    connection).  Nothing else is logged.

Auth / OAuth
 3. POST /oauth2/access_token takes JSON or form-encoded bodies with client_id, client_secret,
    grant_type, redirect_uri and either refresh_token or code.  Success (200,
    application/json): {"token_type":"Bearer","expires_in":TTL,"server_time":now,
    "access_token":..., "refresh_token":...}.
 4. Wrong client_id/client_secret -> 401 {"hint":"Client authentication failed", title,
    type, status, detail}.  Missing parameter or unsupported grant_type -> 400 with a hint.
 5. Refresh tokens are STRICTLY single use: the moment a refresh token is used it is dead;
    using it again -> 400 {"hint":"Token has been revoked", ...}.  An unknown refresh token ->
    400 {"hint":"Cannot decrypt the refresh token", ...}.  --refresh-token is the one
    initially valid refresh token.
 6. grant_type=authorization_code accepts any non-empty code once (redirect_uri required);
    a reused code -> 400 {"hint":"Authorization code has been revoked"}.
 7. Access tokens expire --token-ttl seconds after issue.  Tokens issued earlier stay valid
    until their own expiry even after a later refresh.  The --long-lived-token is accepted as
    a Bearer token forever.
 8. Missing / unknown / expired Bearer token on /api/v4/* -> 401 application/problem+json
    {"title":"Unauthorized","type":"https://httpstatus.es/401","status":401,"detail":...}.

Rate limit and ban (applies to /oauth2/* and /api/v4/*, never to /__admin/*)
 9. At most --rps (7) requests per sliding 1 s window counted over ALL arriving requests,
    rejected ones included (429s and 403s count).  The (rps+1)-th request inside any 1 s
    -> 429, header "Retry-After: 1", empty body.
10. 3 or more 429s within any 10 s -> ban: every request (token endpoint included) gets
    403 text/html nginx "Access denied" page for 60 s.  The third 429 is still sent as 429;
    the ban begins right after it.  POST /__admin/unban lifts it (and forgets past 429s).
11. Stats (GET /__admin/stats): requests, rate_limited, bans, banned_requests,
    max_requests_in_any_1s_window, faults_injected, plus informational counters.

Faults (POST /__admin/faults {"rate": r, "kinds": [...]})
12. Only authenticated /api/v4 calls (auth already passed, not rate limited) are faulted,
    each with probability r; kind chosen uniformly from the configured kinds (default all):
      "500"       problem+json 500, nothing applied;
      "502"       nginx HTML 502 Bad Gateway, nothing applied;
      "504"       nginx HTML 504 Gateway Time-out after a 2 s delay, nothing applied;
      "drop"      connection closed without a response; writes applied half the time;
      "malformed" request processed (writes applied), body truncated mid-JSON, status and
                  Content-Length kept consistent with the truncated body;
      "401"       problem+json 401 "Unauthorized" although the token is valid (the token is
                  NOT revoked);
      "slow"      3 s delay, then processed normally.

Data shapes
13. Lists and entities are application/hal+json; errors are application/problem+json.
    Timestamps are whole Unix seconds.  Account id 28805383.
14. Company JSON: id, name, responsible_user_id, group_id, created_by, updated_by,
    created_at, updated_at, closest_task_at (null), is_deleted, custom_fields_values
    (null or array), account_id, _links.self, _embedded.tags ([{id,name}]).
    with=contacts|leads|customers|catalog_elements add empty arrays under _embedded.
15. custom_fields_values items: {field_id, field_name, field_code (null if none),
    field_type, values}.  multitext values ALWAYS carry "enum_id" and "enum_code";
    select values carry "enum_id"; numeric values are JSON numbers (never strings).
16. Company custom fields: 874201 PHONE multitext (WORK, WORKDD, MOB, FAX, HOME, OTHER),
    874203 EMAIL multitext (WORK, PRIV, OTHER), 874205 WEB url, 874207 ADDRESS textarea,
    874209 "City" text, 874211 "Industry" select, 874213 "Employees" numeric,
    874215 "Annual revenue" numeric.

Listing GET /api/v4/companies
17. page (default 1, >=1), limit (default 50, 1..250).  limit > 250 or < 1, or a
    non-integer page/limit -> 400 (not clamped).
18. Default order (no order param): updated_at DESCENDING, ties by id descending.
    order[updated_at]=asc|desc, order[id]=asc|desc, order[created_at]=asc|desc honoured
    (ties broken by id in the same direction).  Unknown field or direction -> 400.
19. filter[updated_at][from] and [to] are BOTH INCLUSIVE and usable independently; same for
    filter[created_at].  A bare filter[updated_at]=TS means "updated_at == TS" (not "since").
    filter[id] accepts filter[id]=1, filter[id][]=1&filter[id][]=2, filter[id][0]=1 and
    comma lists.  filter[name]=X is an exact (case-insensitive) name match.
    filter[responsible_user_id] likewise.  Non-integer filter values -> 400.  Unknown
    filters are ignored.  GET /api/v4/account?with=is_api_filter_enabled says true.
20. query=X: case-insensitive substring over name and all custom field values, or exact id.
21. An empty page -> HTTP 204 with no body.  _links: self, first, prev (page>1), and next
    whenever the page is full (len == limit) - so next may point at a 204 page.
    Links are absolute, built from the request's Host header, and keep all query params.
22. Deleted companies vanish from lists, from GET by id (204) and from PATCH (400 NotFound).
    with=only_deleted lists only deleted ones: is_deleted true, updated_at = deletion time,
    most other fields null.
23. GET /api/v4/companies/{id} unknown or deleted -> 204 with no body.

Writes
24. POST /api/v4/companies and PATCH /api/v4/companies take a JSON array; PATCH
    /api/v4/companies/{id} takes one object.  Non-array body on a collection endpoint,
    empty array, or > 50 items -> 400 (validation "too many entities, max 50").
25. Validation errors -> 400 {"title":"Bad Request","type":"https://httpstatus.es/400",
    "status":400,"detail":...,"validation-errors":[{"request_id":"0","errors":[{"code",
    "path","detail"}]}]}; the whole batch is validated first and NOTHING is stored on error.
    request_id defaults to the item's index as a string, and is echoed back on success.
26. Checks: name must be a string <= 255 chars; custom field must be known by field_id or
    field_code; multitext enum (enum_code / enum / enum_id) must exist (default WORK);
    select value must match an option value or enum_id; numeric value must be a number or
    numeric string (stored as a number); text values must be scalars; responsible_user_id /
    created_by / updated_by must be 0 or a known user (504141, 504142, 504143);
    PATCH items need an existing, non-deleted id; tags must be objects with id or name.
27. custom_fields_values in a write replaces the values of each field it mentions; other
    fields are untouched.  "values": null clears that field; "" values are ignored (an empty
    string does not clear); "values": [] changes nothing.  When no field is left the company's
    custom_fields_values becomes null.  Non-multitext fields keep the first non-empty value.
28. _embedded.tags replaces the whole tag set (null removes all); tags_to_add /
    tags_to_delete change it incrementally.  Unknown tag names are created.
29. created_at/updated_at sent by the client are ignored: every write is stamped with the
    current whole second, and a PATCH that changes nothing still bumps updated_at.
    updated_by = 504141 (the API user) for API writes, 504143 (a UI user) for admin/mutator.
30. POST answers 200 {_links, _embedded.companies:[{id, request_id, _links}]}; PATCH answers
    200 with [{id, name, updated_at, request_id, _links}]; PATCH /{id} answers that one
    object.  Two identical POSTs create two companies.  There is no DELETE (405).
31. Other endpoints: GET /api/v4/account (with=is_api_filter_enabled adds
    "is_api_filter_enabled": true), GET /api/v4/companies/custom_fields (page 1 holds all,
    later pages 204), GET /api/v4/companies/custom_fields/{id}.  Unknown /api/v4 path ->
    404 problem+json.

Seed data and mutator
32. --companies N generated deterministically from --seed S with fixed timestamps in
    2024-2025 (independent of wall clock): Cyrillic/accented/quoted names, ~5 % duplicate
    names, ~3 % duplicate websites (exact or the other spelling of the same domain),
    ~10 % without website, ~5 % with custom_fields_values null, websites like
    "https://www.example-123.com" or "example-123.com".  About N/8 (max 300, when N >= 20)
    companies were "bulk imported" and share one created_at/updated_at second.
33. --mutations-per-second R (0 = off): a background thread edits (70 %), creates (20 %) or
    deletes (10 %) companies through the same write path as the API (timestamps bump).

Admin (never authenticated, rate limited, faulted or banned)
34. GET /__admin/companies: all companies in API JSON form, deleted ones with is_deleted true.
    GET /__admin/stats.  POST /__admin/mutate {"id"?, "name"?, "custom_fields_values"?,
    "is_deleted"?} edits (or creates without id) and returns the company; unknown id -> 404.
    POST /__admin/faults {"rate", "kinds"?}.  POST /__admin/unban.
    POST /__admin/expire_tokens expires every OAuth access token now (long-lived untouched).
"""

import argparse
import collections
import json
import random
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCOUNT_ID = 28805383
API_USER = 504141
UI_USER = 504143
USERS = {504141: "API Integration", 504142: "Anna Petrova", 504143: "John Smith"}
MAX_BATCH = 50
MAX_LIMIT = 250
ALL_FAULTS = ["500", "502", "504", "drop", "malformed", "401", "slow"]
BASE_TS = 1704067200  # 2024-01-01T00:00:00Z

# ----------------------------------------------------------------------------- fields

def _enums(start, values):
    return [{"id": start + i, "value": v, "sort": (i + 1) * 2} for i, v in enumerate(values)]


FIELDS = [
    {"id": 874201, "name": "Phone", "type": "multitext", "code": "PHONE",
     "enums": _enums(1203001, ["WORK", "WORKDD", "MOB", "FAX", "HOME", "OTHER"])},
    {"id": 874203, "name": "Email", "type": "multitext", "code": "EMAIL",
     "enums": _enums(1203011, ["WORK", "PRIV", "OTHER"])},
    {"id": 874205, "name": "Web", "type": "url", "code": "WEB", "enums": None},
    {"id": 874207, "name": "Address", "type": "textarea", "code": "ADDRESS", "enums": None},
    {"id": 874209, "name": "City", "type": "text", "code": None, "enums": None},
    {"id": 874211, "name": "Industry", "type": "select", "code": None,
     "enums": _enums(1203021, ["Manufacturing", "Retail", "IT & Software", "Finance",
                               "Logistics", "Healthcare", "Education", "Строительство"])},
    {"id": 874213, "name": "Employees", "type": "numeric", "code": None, "enums": None},
    {"id": 874215, "name": "Annual revenue", "type": "numeric", "code": None, "enums": None},
]
FIELD_BY_ID = {f["id"]: f for f in FIELDS}
FIELD_BY_CODE = {f["code"]: f for f in FIELDS if f["code"]}
FIELD_ORDER = {f["id"]: i for i, f in enumerate(FIELDS)}
F_PHONE, F_EMAIL, F_WEB, F_ADDR, F_CITY, F_IND, F_EMP, F_REV = [f["id"] for f in FIELDS]


def field_json(f, base):
    return {
        "id": f["id"], "name": f["name"], "type": f["type"], "account_id": ACCOUNT_ID,
        "code": f["code"], "sort": 500 + FIELD_ORDER[f["id"]] * 10,
        "is_api_only": False, "enums": f["enums"], "group_id": None,
        "required_statuses": [], "is_deletable": f["code"] is None,
        "is_predefined": f["code"] is not None, "entity_type": "companies",
        "remind": None, "triggers": [], "currency": None, "hidden_statuses": [],
        "chained_lists": None, "search_in": None, "tracking_callback": None,
        "_links": {"self": {"href": f"{base}/api/v4/companies/custom_fields/{f['id']}"}},
    }


class ValidationError(Exception):
    def __init__(self, items, detail="Request validation failed"):
        super().__init__(detail)
        self.items = items  # list of (request_id, [(code, path, detail)])
        self.detail = detail

    def body(self):
        return {
            "title": "Bad Request", "type": "https://httpstatus.es/400", "status": 400,
            "detail": self.detail,
            "validation-errors": [
                {"request_id": rid, "errors": [{"code": c, "path": p, "detail": d}
                                               for c, p, d in errs]}
                for rid, errs in self.items],
        }


# ----------------------------------------------------------------------------- store

class Store:
    def __init__(self, n, seed):
        self.lock = threading.RLock()
        self.companies = {}  # id -> internal dict
        self.tags = {}  # lower name -> {"id","name"}
        self.next_tag_id = 70001
        self.rng = random.Random(seed)
        self._generate(n)

    # ---- seed generation
    def _name(self, rng):
        ru_words = ["Ромашка", "Вектор", "Северный ветер", "Альфа-Трейд", "Берёзка",
                    "Снежный барс", "ТехноСтрой", "Горизонт", "Ёлка и Ко", "Сибирь-Логистик"]
        ru_forms = ["ООО «{}»", "АО «{}»", "ЗАО \"{}\"", "ИП {}", "{}"]
        lat_a = ["Müller", "Société Générale d'Études", "Café Zürich", "Øresund", "São Paulo",
                 "Ñandú", "Łódź", "O'Brien", "\"Alpha\"", "Smith & Sons", "Acme", "Globex",
                 "Initech", "Umbrella", "Stark", "Wayne", "Crème Brûlée", "Fjällräven",
                 "Nordic", "Blue Harbor", "Green Valley", "Peter's", "Čapek", "Ångström"]
        lat_b = ["Trading", "Holdings", "Logistics", "Software", "Foods", "Consulting",
                 "Industries", "Partners", "Group", "Labs", ""]
        suffix = ["GmbH", "LLC", "Ltd", "S.A.", "Inc.", "SARL", "AB", "Co.", "", "s.r.o."]
        r = rng.random()
        if r < 0.3:
            return rng.choice(ru_forms).format(rng.choice(ru_words))
        parts = [rng.choice(lat_a), rng.choice(lat_b), rng.choice(suffix)]
        return " ".join(p for p in parts if p)

    def _generate(self, n):
        rng = self.rng
        span = 500 * 86400
        created = sorted(BASE_TS + rng.randrange(span) for _ in range(n))
        if n >= 20:
            bsize = min(300, n // 8)
            start = rng.randrange(0, n - bsize + 1)
            t = created[start]
            for i in range(start, start + bsize):
                created[i] = t
            bulk = set(range(start, start + bsize))
        else:
            bulk = set()
        end_ts = BASE_TS + 520 * 86400
        cid = 10000000 + rng.randrange(1000)
        names, webs = [], []
        used_names = set()
        cities = ["Москва", "Санкт-Петербург", "Zürich", "São Paulo", "Kraków", "Berlin",
                  "New York", "Новосибирск", "Montréal", "Lyon", "Екатеринбург", "London"]
        streets = ["ул. Ленина, д. 1", "Bahnhofstraße 12", "221B Baker Street",
                   "Rue de l'Église 5", "пр-т Мира, 15, офис 3", "Avenida Paulista 1000"]
        tagnames = ["VIP", "partner", "клиент", "lead-2024", "import"]
        for i in range(n):
            cid += rng.randint(1, 7)
            if names and rng.random() < 0.05:
                name = rng.choice(names)  # intentional duplicate
            else:
                name = self._name(rng)
                tries = 0
                while name in used_names and tries < 20:
                    name = self._name(rng)
                    tries += 1
                if name in used_names:
                    name = f"{name} №{i + 1}"
                used_names.add(name)
            names.append(name)
            ca = created[i]
            if i in bulk:
                ua = ca
            elif rng.random() < 0.3:
                ua = ca
            else:
                ua = ca + rng.randrange(0, max(1, min(200 * 86400, end_ts - ca)))
            cf = {}
            if rng.random() >= 0.05:
                r = rng.random()
                if r < 0.10:
                    web = None
                elif webs and r < 0.13:
                    prev = rng.choice(webs)
                    num = prev.rsplit("example-", 1)[1].split(".")[0]
                    web = prev if rng.random() < 0.5 else (
                        f"example-{num}.com" if prev.startswith("https") else
                        f"https://www.example-{num}.com")
                else:
                    num = i + 1
                    web = (f"https://www.example-{num}.com" if rng.random() < 0.5
                           else f"example-{num}.com")
                if web:
                    webs.append(web)
                    cf[F_WEB] = [{"value": web}]
                if rng.random() < 0.8:
                    vals = []
                    for _ in range(rng.choice([1, 1, 2])):
                        en = rng.choice(FIELD_BY_ID[F_PHONE]["enums"])
                        vals.append({"value": "+%d%09d" % (rng.choice([1, 7, 44, 49]),
                                                           rng.randrange(10 ** 9)),
                                     "enum_id": en["id"], "enum_code": en["value"]})
                    cf[F_PHONE] = vals
                if rng.random() < 0.5:
                    en = FIELD_BY_ID[F_EMAIL]["enums"][0]
                    cf[F_EMAIL] = [{"value": f"info{i + 1}@example-{i + 1}.com",
                                    "enum_id": en["id"], "enum_code": "WORK"}]
                if rng.random() < 0.6:
                    cf[F_ADDR] = [{"value": rng.choice(streets)}]
                if rng.random() < 0.7:
                    cf[F_CITY] = [{"value": rng.choice(cities)}]
                if rng.random() < 0.7:
                    en = rng.choice(FIELD_BY_ID[F_IND]["enums"])
                    cf[F_IND] = [{"value": en["value"], "enum_id": en["id"]}]
                if rng.random() < 0.6:
                    cf[F_EMP] = [{"value": rng.choice([1, 5, 12, 50, 120, 999, 2500])}]
                if rng.random() < 0.5:
                    cf[F_REV] = [{"value": rng.choice([125000, 1250000.5, 9999999,
                                                       0, 42.75, 31000000])}]
            tags = []
            if rng.random() < 0.2:
                tags.append(self._tag_by_name(rng.choice(tagnames)))
            ru = rng.choice(list(USERS))
            self.companies[cid] = {
                "id": cid, "name": name, "responsible_user_id": ru, "group_id": 0,
                "created_by": ru, "updated_by": ru, "created_at": ca, "updated_at": ua,
                "closest_task_at": None, "cf": cf, "tags": tags, "is_deleted": False,
            }
        self.next_id = cid + rng.randint(1, 7)

    def _tag_by_name(self, name):
        key = name.lower()
        t = self.tags.get(key)
        if t is None:
            t = {"id": self.next_tag_id, "name": name}
            self.next_tag_id += 1
            self.tags[key] = t
        return dict(t)

    def _tag_by_id(self, tid):
        for t in self.tags.values():
            if t["id"] == tid:
                return dict(t)
        return None

    # ---- rendering
    @staticmethod
    def cf_json(c):
        if not c["cf"]:
            return None
        out = []
        for fid in sorted(c["cf"], key=lambda x: FIELD_ORDER[x]):
            f = FIELD_BY_ID[fid]
            out.append({"field_id": fid, "field_name": f["name"], "field_code": f["code"],
                        "field_type": f["type"], "values": [dict(v) for v in c["cf"][fid]]})
        return out

    def render(self, c, base, with_set=()):
        if c["is_deleted"] and "only_deleted" in with_set:
            d = {"id": c["id"], "name": None, "responsible_user_id": None, "group_id": None,
                 "created_by": None, "updated_by": c["updated_by"], "created_at": None,
                 "updated_at": c["updated_at"], "closest_task_at": None, "is_deleted": True,
                 "custom_fields_values": None, "account_id": ACCOUNT_ID,
                 "_links": {"self": {"href": f"{base}/api/v4/companies/{c['id']}"}},
                 "_embedded": {"tags": []}}
            return d
        d = {k: c[k] for k in ("id", "name", "responsible_user_id", "group_id", "created_by",
                               "updated_by", "created_at", "updated_at", "closest_task_at",
                               "is_deleted")}
        d["custom_fields_values"] = self.cf_json(c)
        d["account_id"] = ACCOUNT_ID
        d["_links"] = {"self": {"href": f"{base}/api/v4/companies/{c['id']}"}}
        emb = {"tags": [dict(t) for t in c["tags"]]}
        for w in ("contacts", "leads", "customers", "catalog_elements"):
            if w in with_set:
                emb[w] = []
        d["_embedded"] = emb
        return d

    # ---- write validation
    def _check_user(self, item, key, path, errs):
        if key in item:
            v = item[key]
            if not isinstance(v, int) or isinstance(v, bool) or (v != 0 and v not in USERS):
                errs.append(("NotSupportedChoice", f"{path}{key}",
                             f"{key} must be 0 or an existing user id"))

    def _prep_cf(self, cfv, path, errs):
        """Validate custom_fields_values; return {field_id: new_values_list|None} or None."""
        if cfv is None:
            return {}
        if not isinstance(cfv, list):
            errs.append(("InvalidType", path, "custom_fields_values must be an array"))
            return {}
        out = {}
        for j, fv in enumerate(cfv):
            p = f"{path}.{j}"
            if not isinstance(fv, dict):
                errs.append(("InvalidType", p, "must be an object"))
                continue
            f = None
            if "field_id" in fv and fv["field_id"] is not None:
                fid = fv["field_id"]
                if isinstance(fid, str) and fid.isdigit():
                    fid = int(fid)
                f = FIELD_BY_ID.get(fid) if isinstance(fid, int) else None
                if f is None:
                    errs.append(("NotSupportedChoice", f"{p}.field_id", "unknown field_id"))
                    continue
            elif fv.get("field_code") is not None:
                f = FIELD_BY_CODE.get(str(fv["field_code"]).upper())
                if f is None:
                    errs.append(("NotSupportedChoice", f"{p}.field_code", "unknown field_code"))
                    continue
            else:
                errs.append(("FieldMissing", f"{p}.field_id", "field_id or field_code required"))
                continue
            if "values" not in fv:
                errs.append(("FieldMissing", f"{p}.values", "values is required"))
                continue
            vals = fv["values"]
            if vals is None:
                out[f["id"]] = None  # clear
                continue
            if not isinstance(vals, list):
                errs.append(("InvalidType", f"{p}.values", "values must be an array or null"))
                continue
            newvals = []
            for k, v in enumerate(vals):
                vp = f"{p}.values.{k}"
                if not isinstance(v, dict):
                    errs.append(("InvalidType", vp, "must be an object"))
                    continue
                val = v.get("value")
                if f["type"] == "select":
                    en = None
                    if v.get("enum_id") is not None:
                        en = next((e for e in f["enums"] if e["id"] == v["enum_id"]), None)
                    elif isinstance(val, str) and val != "":
                        en = next((e for e in f["enums"] if e["value"] == val), None)
                    elif val is None or val == "":
                        continue
                    if en is None:
                        errs.append(("NotSupportedChoice", f"{vp}.value",
                                     "value is not one of the field's options"))
                        continue
                    newvals.append({"value": en["value"], "enum_id": en["id"]})
                    continue
                if val is None or (isinstance(val, str) and val.strip() == ""):
                    continue  # empty strings never clear, they are ignored
                if f["type"] == "numeric":
                    num = None
                    if isinstance(val, bool):
                        num = None
                    elif isinstance(val, (int, float)):
                        num = val
                    elif isinstance(val, str):
                        try:
                            num = float(val.strip().replace(",", "."))
                        except ValueError:
                            num = None
                    if num is None or num != num or num in (float("inf"), float("-inf")):
                        errs.append(("InvalidType", f"{vp}.value", "value must be numeric"))
                        continue
                    if isinstance(num, float) and num.is_integer():
                        num = int(num)
                    newvals.append({"value": num})
                    continue
                if isinstance(val, bool) or not isinstance(val, (str, int, float)):
                    errs.append(("InvalidType", f"{vp}.value", "value must be a string"))
                    continue
                sval = val if isinstance(val, str) else str(val)
                if f["type"] == "multitext":
                    en = None
                    code = v.get("enum_code", v.get("enum"))
                    if v.get("enum_id") is not None:
                        en = next((e for e in f["enums"] if e["id"] == v["enum_id"]), None)
                    elif code is not None:
                        en = next((e for e in f["enums"]
                                   if isinstance(code, str) and e["value"] == code.upper()), None)
                    else:
                        en = f["enums"][0]
                    if en is None:
                        errs.append(("NotSupportedChoice", f"{vp}.enum_code", "unknown enum"))
                        continue
                    newvals.append({"value": sval, "enum_id": en["id"], "enum_code": en["value"]})
                else:
                    if len(sval) > 65535:
                        errs.append(("InvalidLength", f"{vp}.value", "value too long"))
                        continue
                    newvals.append({"value": sval})
            if not newvals:
                continue  # [] or only empty values: no change
            if f["type"] != "multitext":
                newvals = newvals[:1]
            out[f["id"]] = newvals
        return out

    def _prep_tags(self, item, errs):
        ops = []
        emb = item.get("_embedded")
        if emb is not None and not isinstance(emb, dict):
            errs.append(("InvalidType", "_embedded", "must be an object"))
            return ops
        def norm(lst, path):
            res = []
            if not isinstance(lst, list):
                errs.append(("InvalidType", path, "must be an array"))
                return res
            for k, t in enumerate(lst):
                if not isinstance(t, dict) or (t.get("id") is None and not t.get("name")):
                    errs.append(("InvalidType", f"{path}.{k}", "tag needs id or name"))
                    continue
                if t.get("id") is not None and (t.get("name") is None) and \
                        self._tag_by_id(t["id"]) is None:
                    errs.append(("NotFound", f"{path}.{k}.id", "unknown tag id"))
                    continue
                res.append(t)
            return res
        if emb and "tags" in emb:
            ops.append(("set", [] if emb["tags"] is None else norm(emb["tags"], "_embedded.tags")))
        if item.get("tags_to_add") is not None:
            ops.append(("add", norm(item["tags_to_add"], "tags_to_add")))
        if item.get("tags_to_delete") is not None:
            ops.append(("del", norm(item["tags_to_delete"], "tags_to_delete")))
        return ops

    def _resolve_tag(self, t):
        if t.get("name"):
            return self._tag_by_name(str(t["name"]))
        return self._tag_by_id(t["id"])

    def _apply_tags(self, c, ops):
        for op, lst in ops:
            if op == "set":
                c["tags"] = []
                for t in lst:
                    rt = self._resolve_tag(t)
                    if rt and rt["id"] not in {x["id"] for x in c["tags"]}:
                        c["tags"].append(rt)
            elif op == "add":
                for t in lst:
                    rt = self._resolve_tag(t)
                    if rt and rt["id"] not in {x["id"] for x in c["tags"]}:
                        c["tags"].append(rt)
            else:
                drop = set()
                for t in lst:
                    if t.get("id") is not None:
                        drop.add(t["id"])
                    elif t.get("name"):
                        ex = self.tags.get(str(t["name"]).lower())
                        if ex:
                            drop.add(ex["id"])
                c["tags"] = [x for x in c["tags"] if x["id"] not in drop]

    def _validate_item(self, item, idx, mode, errors_out, admin=False):
        """mode: 'create' or 'update'.  Returns a prepared change or None."""
        rid = str(item.get("request_id", idx)) if isinstance(item, dict) else str(idx)
        errs = []
        if not isinstance(item, dict):
            errors_out.append((rid, [("InvalidType", "", "entity must be an object")]))
            return None
        target = None
        if mode == "update":
            iid = item.get("id")
            if isinstance(iid, str) and iid.isdigit():
                iid = int(iid)
            if not isinstance(iid, int) or isinstance(iid, bool):
                errs.append(("FieldMissing", "id", "id is required"))
            else:
                target = self.companies.get(iid)
                if target is None or (target["is_deleted"] and not admin):
                    errs.append(("NotFound", "id", f"company {iid} not found"))
                    target = None
        if "name" in item:
            nm = item["name"]
            if not isinstance(nm, str):
                errs.append(("InvalidType", "name", "name must be a string"))
            elif len(nm) > 255:
                errs.append(("InvalidLength", "name", "name is longer than 255 characters"))
        for key in ("responsible_user_id", "created_by", "updated_by"):
            self._check_user(item, key, "", errs)
        cf = self._prep_cf(item.get("custom_fields_values"), "custom_fields_values", errs)
        tag_ops = self._prep_tags(item, errs)
        if admin and "is_deleted" in item and not isinstance(item["is_deleted"], bool):
            errs.append(("InvalidType", "is_deleted", "must be a boolean"))
        if errs:
            errors_out.append((rid, errs))
            return None
        return {"rid": rid, "item": item, "target": target, "cf": cf, "tags": tag_ops}

    def _apply(self, prep, mode, actor):
        now = int(time.time())
        item = prep["item"]
        if mode == "create":
            cid = self.next_id
            self.next_id += 1
            ru = item.get("responsible_user_id") or actor
            c = {"id": cid, "name": item.get("name") or "", "responsible_user_id": ru,
                 "group_id": 0, "created_by": item.get("created_by") or actor,
                 "updated_by": item.get("updated_by") or actor, "created_at": now,
                 "updated_at": now, "closest_task_at": None, "cf": {}, "tags": [],
                 "is_deleted": False}
            self.companies[cid] = c
        else:
            c = prep["target"]
            if "name" in item:
                c["name"] = item["name"]
            if "responsible_user_id" in item:
                c["responsible_user_id"] = item["responsible_user_id"]
            c["updated_by"] = item.get("updated_by") or actor
            c["updated_at"] = now
        for fid, vals in prep["cf"].items():
            if vals is None:
                c["cf"].pop(fid, None)
            else:
                c["cf"][fid] = vals
        self._apply_tags(c, prep["tags"])
        if "is_deleted" in item and prep.get("admin"):
            c["is_deleted"] = bool(item["is_deleted"])
        return c

    def write(self, items, mode, actor=API_USER, admin=False):
        """All-or-nothing batch write.  Raises ValidationError.  Returns [(company, rid)]."""
        with self.lock:
            errors = []
            preps = []
            for idx, item in enumerate(items):
                p = self._validate_item(item, idx, mode, errors, admin=admin)
                if p is not None:
                    p["admin"] = admin
                    preps.append(p)
            if errors:
                raise ValidationError(errors)
            return [(self._apply(p, mode, actor), p["rid"]) for p in preps]


# ----------------------------------------------------------------------------- limiter

class Limiter:
    def __init__(self, rps):
        self.rps = rps
        self.lock = threading.Lock()
        self.window = collections.deque()
        self.r429 = collections.deque()
        self.ban_until = 0.0
        self.stats = {"requests": 0, "rate_limited": 0, "bans": 0, "banned_requests": 0,
                      "max_requests_in_any_1s_window": 0}

    def arrive(self):
        now = time.monotonic()
        with self.lock:
            self.stats["requests"] += 1
            while self.window and self.window[0] <= now - 1.0:
                self.window.popleft()
            self.window.append(now)
            n = len(self.window)
            if n > self.stats["max_requests_in_any_1s_window"]:
                self.stats["max_requests_in_any_1s_window"] = n
            if now < self.ban_until:
                self.stats["banned_requests"] += 1
                return "403"
            if n > self.rps:
                self.stats["rate_limited"] += 1
                self.r429.append(now)
                while self.r429 and self.r429[0] <= now - 10.0:
                    self.r429.popleft()
                if len(self.r429) >= 3:
                    self.ban_until = now + 60.0
                    self.stats["bans"] += 1
                    self.r429.clear()
                return "429"
            return "ok"

    def unban(self):
        with self.lock:
            was = time.monotonic() < self.ban_until
            self.ban_until = 0.0
            self.r429.clear()
            return was

    def snapshot(self):
        with self.lock:
            d = dict(self.stats)
            rem = self.ban_until - time.monotonic()
            d["banned_now"] = rem > 0
            d["ban_remaining_s"] = round(max(0.0, rem), 1)
            return d


# ----------------------------------------------------------------------------- server state

class State:
    def __init__(self, args):
        self.args = args
        self.store = Store(args.companies, args.seed)
        self.limiter = Limiter(args.rps)
        self.tok_lock = threading.Lock()
        self.access = {}  # token -> expires_at (wall clock)
        self.refresh = {args.refresh_token: "active"}
        self.codes_used = set()
        self.fault_lock = threading.Lock()
        self.fault_rate = 0.0
        self.fault_kinds = list(ALL_FAULTS)
        self.fault_rng = random.Random(args.seed * 7919 + 17)
        self.counters = collections.Counter()
        self.base_default = f"http://127.0.0.1:{args.port}"

    def count(self, key, n=1):
        with self.fault_lock:
            self.counters[key] += n

    def pick_fault(self):
        with self.fault_lock:
            if self.fault_rate <= 0 or not self.fault_kinds:
                return None
            if self.fault_rng.random() >= self.fault_rate:
                return None
            k = self.fault_rng.choice(self.fault_kinds)
            self.counters["faults_injected"] += 1
            self.counters["fault_" + k] += 1
            return k

    def coin(self):
        with self.fault_lock:
            return self.fault_rng.random() < 0.5

    def issue_tokens(self):
        at = "at_" + secrets.token_hex(24)
        rt = "rt_" + secrets.token_hex(24)
        self.access[at] = time.time() + self.args.token_ttl
        self.refresh[rt] = "active"
        self.counters["tokens_issued"] += 1
        return at, rt

    def check_bearer(self, header):
        if not header:
            return "Authorization header is missing"
        parts = header.split(None, 1)
        if len(parts) != 2 or parts[0].lower() != "bearer":
            return "Authorization header must be Bearer"
        tok = parts[1].strip()
        if tok == self.args.long_lived_token:
            return None
        with self.tok_lock:
            exp = self.access.get(tok)
        if exp is None:
            return "Invalid token"
        if time.time() >= exp:
            return "Token has expired"
        return None


NGINX_502 = ("<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
             "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
             "</body>\r\n</html>\r\n")
NGINX_504 = ("<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
             "<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n"
             "</body>\r\n</html>\r\n")
NGINX_403 = ("<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n"
             "<center><h1>403 Forbidden</h1></center>\r\n<p>Access denied</p>\r\n"
             "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


def problem(status, title, detail, **extra):
    d = {"title": title, "type": f"https://httpstatus.es/{status}", "status": status,
         "detail": detail}
    d.update(extra)
    return d


class Resp:
    """A response to be sent (or corrupted by a fault)."""

    def __init__(self, status, body=None, ctype="application/hal+json", headers=None):
        self.status = status
        self.ctype = ctype
        self.headers = headers or {}
        if body is None:
            self.raw = b""
        elif isinstance(body, (bytes, bytearray)):
            self.raw = bytes(body)
        elif isinstance(body, str):
            self.raw = body.encode("utf-8")
        else:
            self.raw = json.dumps(body, ensure_ascii=False).encode("utf-8")


def pjson(status, title, detail, **extra):
    return Resp(status, problem(status, title, detail, **extra), "application/problem+json")


def oauth_err(status, hint, title="Некорректный запрос",
              detail="В запросе отсутствует ряд параметров или параметры невалидны"):
    return Resp(status, {"hint": hint, "title": title,
                         "type": "https://developers.amocrm.ru/v3/errors/OAuthProblemJson",
                         "status": status, "detail": detail}, "application/problem+json")


# ----------------------------------------------------------------------------- handler

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    sys_version = ""
    S: State = None  # set in main

    def version_string(self):
        return "nginx"

    def log_message(self, fmt, *args):  # silence default logging
        pass

    def _log(self, status):
        try:
            sys.stderr.write(f"{self.command} {self.path} {status}\n")
            sys.stderr.flush()
        except Exception:
            pass

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline()
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        tl = self.rfile.readline()
                        if not tl or tl in (b"\r\n", b"\n"):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, r: Resp):
        self.send_response(r.status)
        if r.raw or r.status not in (204, 429):
            self.send_header("Content-Type", r.ctype + "; charset=utf-8"
                             if "charset" not in r.ctype else r.ctype)
        for k, v in r.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.raw)))
        self.end_headers()
        if r.raw and self.command != "HEAD":
            self.wfile.write(r.raw)
        self._log(r.status)

    def _drop(self):
        self.close_connection = True
        try:
            self.wfile.flush()
        except Exception:
            pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except Exception:
            pass
        self._log("drop")

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _base(self):
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.S.base_default

    def _dispatch(self):
        S = self.S
        try:
            body = self._read_body()
        except Exception:
            self._send(pjson(400, "Bad Request", "Unreadable body"))
            return
        u = urllib.parse.urlsplit(self.path)
        path = u.path.rstrip("/") or "/"
        query = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
        try:
            if path.startswith("/__admin/"):
                self._send(self._admin(path, body))
                return
            verdict = S.limiter.arrive()
            if verdict == "403":
                self._send(Resp(403, NGINX_403, "text/html"))
                return
            if verdict == "429":
                self._send(Resp(429, None, headers={"Retry-After": "1"}))
                return
            if path == "/oauth2/access_token":
                if self.command != "POST":
                    self._send(pjson(405, "Method Not Allowed", "Use POST"))
                    return
                self._send(self._oauth(body))
                return
            if not path.startswith("/api/v4/") and path != "/api/v4":
                self._send(pjson(404, "Not Found", "Unknown path"))
                return
            why = S.check_bearer(self.headers.get("Authorization"))
            if why:
                self._send(pjson(401, "Unauthorized", why))
                return
            fault = S.pick_fault()
            is_write = self.command in ("POST", "PATCH", "PUT")
            if fault == "500":
                self._send(pjson(500, "Internal Server Error", "Internal Server Error"))
                return
            if fault == "502":
                self._send(Resp(502, NGINX_502, "text/html"))
                return
            if fault == "504":
                time.sleep(2.0)
                self._send(Resp(504, NGINX_504, "text/html"))
                return
            if fault == "401":
                self._send(pjson(401, "Unauthorized", "Unauthorized"))
                return
            if fault == "slow":
                time.sleep(3.0)
            if fault == "drop":
                if is_write and S.coin():
                    self._api(path, query, body)
                self._drop()
                return
            r = self._api(path, query, body)
            if fault == "malformed":
                raw = r.raw or b'{"_page":1,"_links":{"self":{"href":"'
                cut = max(1, len(raw) // 2)
                r = Resp(r.status if r.raw else 200, raw[:cut], r.ctype)
            self._send(r)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # pragma: no cover - last resort
            try:
                self._send(pjson(500, "Internal Server Error", f"mock error: {e!r}"))
            except Exception:
                self.close_connection = True

    # ------------------------------------------------------------------ oauth
    def _oauth(self, body):
        S = self.S
        ctype = (self.headers.get("Content-Type") or "").lower()
        params = None
        text = body.decode("utf-8", "replace")
        if "json" in ctype or text.lstrip().startswith("{"):
            try:
                params = json.loads(text) if text.strip() else {}
            except ValueError:
                params = None
        if params is None:
            params = dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
        if not isinstance(params, dict):
            return oauth_err(400, "Request body must be an object")
        params = {k: (str(v) if v is not None else "") for k, v in params.items()}
        for key in ("client_id", "client_secret", "grant_type"):
            if not params.get(key):
                return oauth_err(400, f"Check the `{key}` parameter")
        if params["client_id"] != S.args.client_id or \
                params["client_secret"] != S.args.client_secret:
            return oauth_err(401, "Client authentication failed", title="Ошибка авторизации",
                             detail="Клиент не прошёл аутентификацию")
        gt = params["grant_type"]
        with S.tok_lock:
            if gt == "refresh_token":
                rt = params.get("refresh_token")
                if not rt:
                    return oauth_err(400, "Check the `refresh_token` parameter")
                st = S.refresh.get(rt)
                if st is None:
                    S.counters["refresh_unknown"] += 1
                    return oauth_err(400, "Cannot decrypt the refresh token")
                if st != "active":
                    S.counters["refresh_reused"] += 1
                    return oauth_err(400, "Token has been revoked")
                S.refresh[rt] = "used"
                S.counters["refreshes"] += 1
            elif gt == "authorization_code":
                code = params.get("code")
                if not code:
                    return oauth_err(400, "Check the `code` parameter")
                if not params.get("redirect_uri"):
                    return oauth_err(400, "Check the `redirect_uri` parameter")
                if code in S.codes_used:
                    return oauth_err(400, "Authorization code has been revoked")
                S.codes_used.add(code)
            else:
                return oauth_err(400, "Unsupported grant type", title="Unsupported grant type")
            at, nrt = S.issue_tokens()
        return Resp(200, {"token_type": "Bearer", "expires_in": S.args.token_ttl,
                          "server_time": int(time.time()), "access_token": at,
                          "refresh_token": nrt}, "application/json")

    # ------------------------------------------------------------------ API
    def _api(self, path, query, body):
        m = self.command
        parts = path.split("/")[1:]  # ['api','v4',...]
        rest = parts[2:]
        base = self._base()
        if rest == ["account"]:
            if m != "GET":
                return pjson(405, "Method Not Allowed", "Method not allowed")
            return self._account(query, base)
        if not rest or rest[0] != "companies":
            return pjson(404, "Not Found", "Unknown path")
        if len(rest) == 1:
            if m == "GET":
                return self._list(query, base)
            if m in ("POST", "PATCH"):
                return self._write_collection(body, "create" if m == "POST" else "update", base)
            return pjson(405, "Method Not Allowed", "Method not allowed")
        if rest[1] == "custom_fields":
            if m != "GET":
                return pjson(405, "Method Not Allowed", "Method not allowed")
            if len(rest) == 2:
                return self._fields(query, base)
            if len(rest) == 3 and rest[2].isdigit() and int(rest[2]) in FIELD_BY_ID:
                return Resp(200, field_json(FIELD_BY_ID[int(rest[2])], base))
            return Resp(204)
        if len(rest) == 2 and rest[1].isdigit():
            cid = int(rest[1])
            if m == "GET":
                with_set = self._with(query)
                st = self.S.store
                with st.lock:
                    c = st.companies.get(cid)
                    if c is None or c["is_deleted"]:
                        return Resp(204)
                    return Resp(200, st.render(c, base, with_set))
            if m == "PATCH":
                item = self._json(body)
                if isinstance(item, Resp):
                    return item
                if not isinstance(item, dict):
                    return pjson(400, "Bad Request", "Body must be a JSON object")
                item = dict(item)
                item["id"] = cid
                try:
                    res = self.S.store.write([item], "update")
                except ValidationError as e:
                    return Resp(400, e.body(), "application/problem+json")
                c, rid = res[0]
                return Resp(200, {"id": c["id"], "name": c["name"],
                                  "updated_at": c["updated_at"],
                                  "_links": {"self": {"href": f"{base}/api/v4/companies/{c['id']}"}}})
            return pjson(405, "Method Not Allowed", "Method not allowed")
        return pjson(404, "Not Found", "Unknown path")

    @staticmethod
    def _with(query):
        s = set()
        for k, v in query:
            if k == "with":
                s.update(x.strip() for x in v.split(",") if x.strip())
        return s

    @staticmethod
    def _json(body):
        try:
            return json.loads(body.decode("utf-8")) if body.strip() else None
        except (ValueError, UnicodeDecodeError):
            return pjson(400, "Bad Request", "Malformed JSON body")

    def _account(self, query, base):
        with_set = self._with(query)
        d = {"id": ACCOUNT_ID, "name": "Mock Trading Ltd", "subdomain": "mocktrading",
             "created_at": 1577836800, "created_by": API_USER, "updated_at": 1700000000,
             "updated_by": API_USER, "current_user_id": API_USER, "country": "RU",
             "currency": "RUB", "currency_symbol": "₽", "customers_mode": "disabled",
             "is_unsorted_on": True, "is_loss_reason_enabled": True,
             "is_helpbot_enabled": False, "is_technical_account": False,
             "contact_name_display_order": 1, "mobile_feature_version": 0,
             "_links": {"self": {"href": f"{base}/api/v4/account"}}}
        if "is_api_filter_enabled" in with_set:
            d["is_api_filter_enabled"] = True
        if "amojo_id" in with_set:
            d["amojo_id"] = "5a1b2c3d-0000-4000-8000-000000000001"
        if "users_groups" in with_set:
            d.setdefault("_embedded", {})["users_groups"] = [{"id": 0, "name": "Отдел продаж",
                                                             "uuid": None}]
        if "version" in with_set:
            d["version"] = 42
        return Resp(200, d)

    def _fields(self, query, base):
        page = 1
        for k, v in query:
            if k == "page":
                try:
                    page = int(v)
                except ValueError:
                    return pjson(400, "Bad Request", "page must be an integer")
        if page != 1:
            return Resp(204)
        return Resp(200, {
            "_total_items": len(FIELDS), "_page": 1, "_page_count": 1,
            "_links": {"self": {"href": f"{base}/api/v4/companies/custom_fields?page=1"}},
            "_embedded": {"custom_fields": [field_json(f, base) for f in FIELDS]}})

    def _bad_param(self, code, path, detail):
        e = ValidationError([("0", [(code, path, detail)])], detail)
        return Resp(400, e.body(), "application/problem+json")

    def _list(self, query, base):
        S = self.S
        page, limit = 1, 50
        q = None
        order = None
        filters = collections.defaultdict(list)
        for k, v in query:
            if k == "page":
                try:
                    page = int(v)
                except ValueError:
                    return self._bad_param("InvalidType", "page", "page must be an integer")
                if page < 1:
                    return self._bad_param("InvalidValue", "page", "page must be >= 1")
            elif k == "limit":
                try:
                    limit = int(v)
                except ValueError:
                    return self._bad_param("InvalidType", "limit", "limit must be an integer")
                if limit < 1 or limit > MAX_LIMIT:
                    return self._bad_param("InvalidValue", "limit",
                                           f"limit must be between 1 and {MAX_LIMIT}")
            elif k == "query":
                q = v.strip().lower() or None
            elif k.startswith("order[") and k.endswith("]"):
                fld = k[6:-1]
                d = v.strip().lower()
                if fld not in ("updated_at", "id", "created_at") or d not in ("asc", "desc"):
                    return self._bad_param("InvalidValue", k, "unsupported order")
                if order is None:
                    order = (fld, d)
            elif k.startswith("filter["):
                inner = k[len("filter["):]
                name, _, sub = inner.partition("]")
                sub = sub.strip("[]")
                filters[name].append((sub, v))
        with_set = self._with(query)
        only_deleted = "only_deleted" in with_set

        def ints(vals, label):
            out = []
            for v in vals:
                for piece in str(v).split(","):
                    piece = piece.strip()
                    if piece == "":
                        continue
                    try:
                        out.append(int(piece))
                    except ValueError:
                        raise ValueError(label)
            return out

        try:
            id_set = None
            if "id" in filters:
                id_set = set(ints([v for _, v in filters["id"]], "filter[id]"))
            rng = {}
            for fld in ("updated_at", "created_at"):
                if fld in filters:
                    lo = hi = None
                    for sub, v in filters[fld]:
                        got = ints([v], f"filter[{fld}]")
                        if len(got) > 1:
                            raise ValueError(f"filter[{fld}]")
                        if not got:
                            continue
                        val = got[0]
                        if sub == "from":
                            lo = val
                        elif sub == "to":
                            hi = val
                        else:  # bare value: exact match
                            lo = hi = val
                    rng[fld] = (lo, hi)
            ru_set = None
            if "responsible_user_id" in filters:
                ru_set = set(ints([v for _, v in filters["responsible_user_id"]],
                                  "filter[responsible_user_id]"))
        except ValueError as e:
            return self._bad_param("InvalidType", str(e), "filter value must be an integer")
        name_f = None
        if "name" in filters:
            name_f = {v.strip().lower() for _, v in filters["name"]}

        st = S.store
        with st.lock:
            rows = []
            for c in st.companies.values():
                if c["is_deleted"] != only_deleted:
                    continue
                if id_set is not None and c["id"] not in id_set:
                    continue
                if ru_set is not None and c["responsible_user_id"] not in ru_set:
                    continue
                ok = True
                for fld, (lo, hi) in rng.items():
                    if (lo is not None and c[fld] < lo) or (hi is not None and c[fld] > hi):
                        ok = False
                        break
                if not ok:
                    continue
                if name_f is not None and (c["name"] or "").lower() not in name_f:
                    continue
                if q is not None:
                    hay = [(c["name"] or "").lower()]
                    for vals in c["cf"].values():
                        hay.extend(str(v["value"]).lower() for v in vals)
                    if not (any(q in h for h in hay) or (q.isdigit() and int(q) == c["id"])):
                        continue
                rows.append(c)
            fld, d = order or ("updated_at", "desc")
            if fld == "id":
                rows.sort(key=lambda c: c["id"], reverse=(d == "desc"))
            else:
                rows.sort(key=lambda c: (c[fld], c["id"]), reverse=(d == "desc"))
            chunk = rows[(page - 1) * limit: page * limit]
            items = [st.render(c, base, with_set) for c in chunk]
        if not items:
            return Resp(204)

        def link(p):
            qs = [(k, v) for k, v in query if k != "page"] + [("page", str(p))]
            return {"href": f"{base}/api/v4/companies?{urllib.parse.urlencode(qs)}"}

        links = {"self": link(page), "first": link(1)}
        if page > 1:
            links["prev"] = link(page - 1)
        if len(items) == limit:
            links["next"] = link(page + 1)
        return Resp(200, {"_page": page, "_links": links, "_embedded": {"companies": items}})

    def _write_collection(self, body, mode, base):
        data = self._json(body)
        if isinstance(data, Resp):
            return data
        if not isinstance(data, list):
            return self._bad_param("InvalidType", "", "request body must be a JSON array")
        if not data:
            return self._bad_param("FieldMissing", "", "request body must not be empty")
        if len(data) > MAX_BATCH:
            e = ValidationError([("0", [("TooManyEntities", "",
                                          f"too many entities, max {MAX_BATCH}")])],
                                f"too many entities, max {MAX_BATCH}")
            return Resp(400, e.body(), "application/problem+json")
        try:
            res = self.S.store.write(data, mode)
        except ValidationError as e:
            return Resp(400, e.body(), "application/problem+json")
        out = []
        for c, rid in res:
            d = {"id": c["id"]}
            if mode == "update":
                d["name"] = c["name"]
                d["updated_at"] = c["updated_at"]
            d["request_id"] = rid
            d["_links"] = {"self": {"href": f"{base}/api/v4/companies/{c['id']}"}}
            out.append(d)
        return Resp(200, {"_links": {"self": {"href": f"{base}/api/v4/companies"}},
                          "_embedded": {"companies": out}})

    # ------------------------------------------------------------------ admin
    def _admin(self, path, body):
        S = self.S
        m = self.command
        base = self._base()
        if path == "/__admin/companies" and m == "GET":
            with S.store.lock:
                arr = [S.store.render(c, base) for c in
                       sorted(S.store.companies.values(), key=lambda c: c["id"])]
            return Resp(200, arr, "application/json")
        if path == "/__admin/stats" and m == "GET":
            d = S.limiter.snapshot()
            with S.fault_lock:
                d["faults_injected"] = S.counters.get("faults_injected", 0)
                d["fault_rate"] = S.fault_rate
                d["fault_kinds"] = list(S.fault_kinds)
                d["counters"] = dict(S.counters)
            with S.store.lock:
                d["companies_total"] = len(S.store.companies)
                d["companies_deleted"] = sum(1 for c in S.store.companies.values()
                                             if c["is_deleted"])
            return Resp(200, d, "application/json")
        if path == "/__admin/unban" and m == "POST":
            was = S.limiter.unban()
            return Resp(200, {"ok": True, "was_banned": was}, "application/json")
        if path == "/__admin/expire_tokens" and m == "POST":
            with S.tok_lock:
                for t in S.access:
                    S.access[t] = 0
            return Resp(200, {"ok": True}, "application/json")
        if path == "/__admin/faults" and m == "POST":
            data = self._json(body)
            if isinstance(data, Resp):
                return data
            if not isinstance(data, dict) or not isinstance(data.get("rate", 0), (int, float)):
                return pjson(400, "Bad Request", "expected {\"rate\": r, \"kinds\": [...]}")
            kinds = data.get("kinds") or list(ALL_FAULTS)
            kinds = [str(k) for k in kinds]
            bad = [k for k in kinds if k not in ALL_FAULTS]
            if bad:
                return pjson(400, "Bad Request", f"unknown fault kinds {bad}")
            with S.fault_lock:
                S.fault_rate = max(0.0, min(1.0, float(data.get("rate", 0))))
                S.fault_kinds = kinds
            return Resp(200, {"rate": S.fault_rate, "kinds": kinds}, "application/json")
        if path == "/__admin/mutate" and m == "POST":
            data = self._json(body)
            if isinstance(data, Resp):
                return data
            if not isinstance(data, dict):
                return pjson(400, "Bad Request", "expected a JSON object")
            try:
                c = admin_mutate(S.store, data)
            except KeyError:
                return pjson(404, "Not Found", "no such company")
            except ValidationError as e:
                return Resp(400, e.body(), "application/problem+json")
            with S.store.lock:
                return Resp(200, S.store.render(c, base), "application/json")
        return pjson(404, "Not Found", "unknown admin endpoint")


def admin_mutate(store, data):
    if data.get("id") is not None:
        with store.lock:
            iid = data["id"]
            if not isinstance(iid, int) or iid not in store.companies:
                raise KeyError(iid)
            return store.write([data], "update", actor=UI_USER, admin=True)[0][0]
    item = {k: v for k, v in data.items() if k != "id"}
    with store.lock:
        c = store.write([item], "create", actor=UI_USER, admin=True)[0][0]
        return c


def mutator(state, rate, seed):
    rng = random.Random(seed * 31 + 5)
    store = state.store
    cities = ["Казань", "Genève", "Porto", "Bordeaux", "Toronto", "Dublin"]
    while True:
        time.sleep(1.0 / rate)
        try:
            with store.lock:
                live = [cid for cid, c in store.companies.items() if not c["is_deleted"]]
            r = rng.random()
            if r < 0.2 or not live:
                n = rng.randrange(100000)
                admin_mutate(store, {"name": f"Mutant «{n}» GmbH", "custom_fields_values": [
                    {"field_code": "WEB", "values": [{"value": f"https://www.example-m{n}.com"}]},
                    {"field_id": F_CITY, "values": [{"value": rng.choice(cities)}]}]})
            elif r < 0.3:
                admin_mutate(store, {"id": rng.choice(live), "is_deleted": True})
            else:
                cid = rng.choice(live)
                if rng.random() < 0.5:
                    admin_mutate(store, {"id": cid, "name": f"Renamed Ёж {rng.randrange(10000)}"})
                else:
                    admin_mutate(store, {"id": cid, "custom_fields_values": [
                        {"field_id": F_CITY, "values": [{"value": rng.choice(cities)}]}]})
        except Exception as e:  # keep running
            sys.stderr.write(f"mutator error: {e!r}\n")


def main():
    ap = argparse.ArgumentParser(description="amoCRM v4 companies mock")
    ap.add_argument("--port", type=int, default=9703)
    ap.add_argument("--client-id", default="aid")
    ap.add_argument("--client-secret", default="asecret")
    ap.add_argument("--refresh-token", default="rt0")
    ap.add_argument("--long-lived-token", default="llt")
    ap.add_argument("--companies", type=int, default=1000)
    ap.add_argument("--rps", type=int, default=7)
    ap.add_argument("--token-ttl", type=int, default=86400)
    ap.add_argument("--mutations-per-second", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    state = State(args)
    Handler.S = state
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.mutations_per_second > 0:
        threading.Thread(target=mutator, args=(state, args.mutations_per_second, args.seed),
                         daemon=True).start()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
