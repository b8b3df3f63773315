#!/usr/bin/env python3
"""Independent amoCRM API v4 Companies mock (OAuth token endpoint, custom fields, companies).

Built from /work/shared/api/{amocrm-companies.txt, amocrm-notes.md, README.md, pitfalls.md} and
knowledge of real amoCRM only. Start:
  python3 server.py --port 9703 --client-id ID --client-secret SECRET --refresh-token RT \
      --long-lived-token T --companies N --rps 7 --token-ttl 86400 --mutations-per-second R --seed S

Choices made where the documents are silent (or disagree), following real amoCRM where known:
 1. Refresh rotation: every refresh returns a new pair. Per amocrm-notes the OLD refresh token
    keeps working until the NEW one is used for a refresh; after that the old one answers
    400 {"hint":"Token has been revoked",...} (the brief's 400, as observed on real amoCRM; the
    notes say 401). Re-using an old token in its grace period issues a fresh pair and revokes the
    previously issued, never-used successor. --no-refresh-grace makes tokens strictly single-use.
    Unknown refresh token -> 400 "Cannot decrypt the refresh token". Wrong client_id/secret ->
    401 "Client authentication failed". Missing parameter (redirect_uri included; any value is
    accepted) -> 400. authorization_code grant -> 400 (no codes exist). Old access tokens stay
    valid until their own expiry. Refresh tokens do not expire within a run.
 2. OAuth error bodies use amoCRM's OAuthProblemJson shape {hint,title,type,status,detail}.
 3. 401 on the API: application/problem+json {title:"Unauthorized",type,status:401,detail}.
 4. Rate limit: strict sliding 1-second window over ACCEPTED requests (429s do not consume
    budget; no burst allowance, so a client pacing at exactly rps can see jitter 429s - pace below),
    shared by /api/v4/* and /oauth2/* (one account). 429 body: problem JSON with retry_after 1 and
    NO Retry-After header; --html-429-fraction makes that share of 429s an nginx HTML page.
    Ban: more than 3*rps 429s within 10 s -> every request (token endpoint included) gets an
    nginx HTML 403 for --ban-seconds (60); requests during a ban do not extend it. Ban/rate checks
    come before auth. POST /__admin/unban lifts it ("support").
    Stats: "requests" counts every non-admin request; max_requests_in_any_1s_window is over all
    arriving non-admin requests, rejected ones included.
 5. Faults (/__admin/faults) apply only to authenticated /api/v4 calls, after rate limiting; they
    happen BEFORE any write is stored (no side effects), unless {"commit_before_fault": true}.
    Kinds, uniform: 500 (problem JSON), 502/503 (nginx HTML), dropped connection (no response),
    malformed JSON (HTTP 200, truncated body), 401 "token expired" (the token stays valid).
 6. List: default order id asc; one order key (first of updated_at/created_at/id), ties broken by id
    in the same direction. page<1 -> 1; limit default 50, >250 silently clamped to 250, <1 -> 50.
    _links.next is present iff the page is full (so it can lead to a 204). Non-integer page/limit
    -> 400. filter[updated_at][from]/[to] inclusive, each bound honoured alone; a bare
    filter[updated_at]=TS means "equal to TS" (not "since"); same for created_at. filter[id] accepts
    filter[id][]=, filter[id][n]= and filter[id]=. filter[name] exact match. With
    --api-filter-disabled all filter[...] params are silently ignored (as on accounts without
    is_api_filter_enabled); GET /api/v4/account?with=is_api_filter_enabled reports it.
    query: case-insensitive substring over name and custom field values; digit-only match for
    phone-like queries. with=only_deleted lists deleted companies with most fields null.
    with=contacts|leads|customers|catalog_elements adds empty arrays.
 7. Seed: ids ascend with created_at; when N>=100 a "bulk import" of min(260, N//2) companies shares
    one created_at/updated_at second (more than a 250 page). ~15% have custom_fields_values null.
    ~20% of companies render multitext enums as "enum" instead of "enum_code" (notes: accept both).
    Numeric custom field values are returned as strings. Names include Cyrillic/accents/quotes.
 8. Writes: POST/PATCH bodies must be JSON arrays (single PATCH: an object); empty array -> 400;
    more than 250 -> 422 (per notes). Any invalid entity -> 400 validation-errors with all errors
    of all entities, nothing stored. request_id defaults to the array index as a string.
    Codes: InvalidType, FieldMissing, NotSupportedChoice (unknown field_id/field_code/enum/user),
    NotFound (PATCH unknown/deleted id), FieldNotExpected (created_by/updated_by in PATCH: the notes
    say sending these back has caused validation errors), InvalidValue (several values for a
    single-value field, name longer than 255). Unknown top-level keys are ignored.
    custom_fields_values: a field entry is replaced as a whole; "values": null clears it; values
    with "" are dropped and a field left with no values is unchanged (empty string does not clear).
    Multitext without enum -> first enum (WORK); enum_code or enum accepted on write. POST:
    created_at/updated_at default to now (updated_at = now even if only created_at is given),
    created_by/updated_by/responsible_user_id default to the API user 504141 and must be known
    users (0 allowed for created_by/updated_by). Non-integer field_id -> NotSupportedChoice.
    Every accepted PATCH bumps updated_at (unless updated_at is given) even if nothing changed;
    updated_by = the API user 504141.
    PATCH /companies/{id} on an unknown id -> 400 NotFound. _embedded.tags replaces the set
    (null removes all), tags_to_add / tags_to_delete change it incrementally.
 9. GET /companies/{id} for an unknown or deleted id -> 204. No DELETE (405).
10. Mutator: R events/s; ~10% create a company, the rest edit a random live company (name, phone,
    email, employees, revenue, city, industry or responsible user) and bump updated_at; updated_by
    is a random user. It never deletes; /__admin/mutate {"id","is_deleted":true} does.
11. Responses: success application/hal+json (token endpoint application/json), errors
    application/problem+json, JSON is UTF-8 with unescaped non-ASCII; HTTP/1.1 keep-alive;
    custom_fields list is paged with limit max 50 and has _total_items/_page_count.
    GET /api/v4/account exists (with=is_api_filter_enabled). Unknown paths -> 404 problem JSON.
12. GET /__admin/companies returns a JSON array of all companies, sorted by id, in API form
    (deleted ones included with is_deleted true and their real name/fields).
    POST /__admin/mutate without id creates a company. Extra stats keys are added.
"""
import argparse, json, random, re, secrets, threading, time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

ACCOUNT_ID = 28805383
USERS = [504141, 504142, 504143, 6117981, 6117982]
API_USER = 504141
HTML403 = ('<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n<center><h1>403 Forbidden'
           '</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n')


def html(code, text):
    return ('<html>\r\n<head><title>%d %s</title></head>\r\n<body>\r\n<center><h1>%d %s</h1></center>'
            '\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n' % (code, text, code, text))


def _enums(start, values):
    return [{"id": start + i, "value": v, "sort": (i + 1) * 2} for i, v in enumerate(values)]


FIELDS = [{"id": i, "name": n, "code": c, "type": t, "enums": _enums(es, ev) if ev else None} for i, n, c, t, es, ev in [
    (560001, "Phone", "PHONE", "multitext", 1001, ["WORK", "WORKDD", "MOB", "FAX", "HOME", "OTHER"]),
    (560003, "Email", "EMAIL", "multitext", 1011, ["WORK", "PRIV", "OTHER"]),
    (560005, "Web", "WEB", "url", 0, None), (560007, "Address", "ADDRESS", "textarea", 0, None),
    (874201, "Industry", None, "select", 2001, ["Software", "Manufacturing", "Retail", "Finance", "Healthcare",
                                                 "Logistics", "Education", "Media"]),
    (874203, "Employees", None, "numeric", 0, None), (874205, "Annual revenue", None, "numeric", 0, None),
    (874207, "Country", None, "text", 0, None), (874209, "City", None, "text", 0, None),
    (874211, "External ID", None, "text", 0, None)]]
F_BY_ID = {f["id"]: f for f in FIELDS}
F_BY_CODE = {f["code"]: f for f in FIELDS if f["code"]}
ENUM_VAL = {e["id"]: e["value"] for f in FIELDS for e in (f["enums"] or [])}
F = {f["name"]: f["id"] for f in FIELDS}

A = ["Acme", "Globex", "Initech", "Umbrella", "Northwind", "Contoso", "Fabrikam", "Stark", "Wayne",
     "Wonka", "Tyrell", "Cyberdyne", "Soylent", "Hooli", "Vandelay", "Pied Piper", "Oceanic",
     "Blue Sun", "Massive Dynamic", "Aperture", "Black Mesa", "Monarch", "Dunder Mifflin",
     "Sterling Cooper", "Bluth", "Nakatomi", "Gekko", "Duff", "Oscorp", "Virtucon"]
B = ["Logistics", "Software", "Holdings", "Partners", "Foods", "Labs", "Systems", "Consulting",
     "Trading", "Media", "Robotics", "Energy", "Analytics", "Group", "Studio"]
C = ["Inc.", "LLC", "Ltd", "GmbH", "S.A.", "Corp.", "AG", "", "", "Oy", "B.V."]
RU = ["Ромашка", "Вектор", "Север", "Горизонт", "Сибирь", "Альфа-Строй", "Технопарк", "Метелица"]
ODD = ["Café Müller", "Société Générale d'Essai", "Zürich Ärzte AG", "O'Brien & Sons",
       'Smith "Quoted" Co', "Łódź Tech Sp. z o.o.", "Ørsted Vind ApS", "東京テック株式会社"]
PLACES = [("USA", "New York"), ("USA", "Austin"), ("Germany", "Berlin"), ("Germany", "Munich"),
          ("Russia", "Moscow"), ("Russia", "Kazan"), ("UK", "London"), ("France", "Lyon"),
          ("Spain", "Madrid"), ("Brazil", "São Paulo"), ("Japan", "Osaka"), ("Kazakhstan", "Almaty")]
STREETS = ["Main St", "Market St", "Lenina ul.", "Hauptstraße", "High Street", "Rue de la Paix"]


DET = {"NotSupportedChoice": "The value you selected is not a valid choice.", "FieldMissing": "This field is missing.",
       "NotFound": "Entity not found", "FieldNotExpected": "This field is read-only for update."}


def is_int(v):
    return type(v) is int


class State:
    def __init__(s, a):
        s.a = a
        s.lock = threading.RLock()
        s.rng = random.Random(a.seed)
        s.frng = random.Random(a.seed * 7919 + 1)
        s.companies = {}
        s.next_id = 7767000
        s.tags, s.next_tag = {}, 30001
        s.access = {}            # access token -> expiry (epoch seconds)
        s.rts = {a.refresh_token: {"revoked": False, "parent": None, "succ": None}}
        s.fault_rate, s.fault_commit = 0.0, False
        s.accepted, s.arrivals, s.rejects = deque(), deque(), deque()
        s.ban_until = 0.0
        s.stats = {"requests": 0, "rate_limited_429": 0, "banned_403": 0,
                   "max_requests_in_any_1s_window": 0, "unauthorized_401": 0, "refreshes": 0,
                   "refresh_rejected": 0, "faults_injected": 0, "validation_400": 0,
                   "companies_created": 0, "companies_patched": 0, "mutations": 0}
        s.seed(a.companies)

    # ---------- seeding / generation ----------
    def gen_name(s, r):
        x = r.random()
        if x < 0.08:
            return "%s «%s»" % (r.choice(["ООО", "АО", "ЗАО"]), r.choice(RU))
        if x < 0.12:
            return r.choice(ODD)
        return " ".join(p for p in (r.choice(A), r.choice(B), r.choice(C)) if p)

    def gen_cf(s, r, name):
        if r.random() < 0.15:
            return {}
        slug = re.sub(r"[^a-z0-9]+", "", name.lower())[:16] or "company%d" % r.randint(1, 999)
        cf = {F["Phone"]: [{"value": r.choice(["+1 415 555 %04d", "+7 (495) 123-%04d", "+4930 555%04d",
                                                "(212) 555-%04d"]) % r.randint(0, 9999),
                            "enum_id": 1001}]}
        if r.random() < 0.3:
            cf[F["Phone"]].append({"value": "+1 650 555 %04d" % r.randint(0, 9999),
                                   "enum_id": r.choice([1002, 1003, 1004])})
        if r.random() < 0.7:
            cf[F["Email"]] = [{"value": "info@%s.com" % slug, "enum_id": 1011}]
        if r.random() < 0.6:
            cf[F["Web"]] = [{"value": "https://www.%s.com" % slug}]
        country, city = r.choice(PLACES)
        if r.random() < 0.5:
            cf[F["Address"]] = [{"value": "%d %s\n%s, %s" % (r.randint(1, 999), r.choice(STREETS), city, country)}]
        if r.random() < 0.7:
            e = r.choice(F_BY_ID[F["Industry"]]["enums"])
            cf[F["Industry"]] = [{"value": e["value"], "enum_id": e["id"]}]
        if r.random() < 0.6:
            cf[F["Employees"]] = [{"value": str(r.choice([5, 12, 40, 150, 800, 5000]) + r.randint(0, 9))}]
        if r.random() < 0.4:
            cf[F["Annual revenue"]] = [{"value": str(r.randint(10, 90000) * 1000)}]
        if r.random() < 0.6:
            cf[F["Country"]], cf[F["City"]] = [{"value": country}], [{"value": city}]
        if r.random() < 0.5:
            cf[F["External ID"]] = [{"value": "EXT-%06d" % r.randint(1, 999999)}]
        return cf

    def new_company(s, r, ts, name=None, cf=None, user=API_USER):
        s.next_id += r.randint(1, 40)
        c = {"id": s.next_id, "name": name if name is not None else s.gen_name(r),
             "responsible_user_id": user, "group_id": 0, "created_by": user, "updated_by": user,
             "created_at": ts, "updated_at": ts, "closest_task_at": None, "is_deleted": False,
             "cf": cf if cf is not None else {}, "tags": [], "ek": "enum_code"}
        s.companies[c["id"]] = c
        return c

    def seed(s, n):
        r, now = s.rng, int(time.time())
        stamps = sorted(now - r.randint(2 * 86400, 730 * 86400) for _ in range(n))
        bulk = min(260, n // 2) if n >= 100 else 0
        if bulk:
            imp = now - 3 * 86400 - 4242
            stamps = sorted(stamps[:n - bulk] + [imp] * bulk)
        for ts in stamps:
            name = s.gen_name(r)
            c = s.new_company(r, ts, name, s.gen_cf(r, name), r.choice(USERS))
            c["ek"] = "enum" if r.random() < 0.2 else "enum_code"
            if ts != (bulk and imp) and r.random() < 0.5:
                c["updated_at"] = r.randint(ts, now - 60)
                c["updated_by"] = r.choice(USERS)
            if r.random() < 0.2:
                c["tags"] = [s.tag({"name": r.choice(["vip", "partner", "lead-gen", "import"])})]

    def tag(s, t):
        if is_int(t.get("id")) and t["id"] in s.tags:
            return {"id": t["id"], "name": s.tags[t["id"]]}
        for i, nm in s.tags.items():
            if nm == t.get("name"):
                return {"id": i, "name": nm}
        s.next_tag += 1
        s.tags[s.next_tag] = t.get("name")
        return {"id": s.next_tag, "name": t.get("name")}

    # ---------- rendering ----------
    def render_cf(s, c):
        out = []
        for f in FIELDS:
            vals = c["cf"].get(f["id"])
            if not vals:
                continue
            rv = []
            for v in vals:
                d = {"value": v["value"]}
                if f["type"] == "multitext":
                    d["enum_id"], d[c["ek"]] = v["enum_id"], ENUM_VAL[v["enum_id"]]
                elif f["type"] == "select":
                    d["enum_id"], d["enum_code"] = v["enum_id"], None
                rv.append(d)
            out.append({"field_id": f["id"], "field_name": f["name"], "field_code": f["code"],
                        "field_type": f["type"], "values": rv})
        return out or None

    def render(s, c, base, with_=()):
        link = {"self": {"href": "%s/api/v4/companies/%d" % (base, c["id"])}}
        if c["is_deleted"]:
            d = {k: None for k in ("name", "responsible_user_id", "group_id", "created_by", "created_at",
                                   "closest_task_at", "custom_fields_values")}
            d.update(id=c["id"], updated_by=c["updated_by"], updated_at=c["updated_at"], is_deleted=True,
                     account_id=ACCOUNT_ID, _links=link, _embedded={"tags": []})
            return d
        d = {k: c[k] for k in ("id", "name", "responsible_user_id", "group_id", "created_by", "updated_by",
                               "created_at", "updated_at", "closest_task_at", "is_deleted")}
        d.update(custom_fields_values=s.render_cf(c), account_id=ACCOUNT_ID, _links=link,
                 _embedded={"tags": [dict(t) for t in c["tags"]]})
        for w in ("contacts", "leads", "customers", "catalog_elements"):
            if w in with_:
                d["_embedded"][w] = []
        return d

    # ---------- gatekeeping ----------
    def gate(s):
        now = time.monotonic()
        with s.lock:
            st = s.stats
            st["requests"] += 1
            s.arrivals.append(now)
            while s.arrivals and s.arrivals[0] <= now - 1.0:
                s.arrivals.popleft()
            st["max_requests_in_any_1s_window"] = max(st["max_requests_in_any_1s_window"], len(s.arrivals))
            if now < s.ban_until:
                st["banned_403"] += 1
                return "ban"
            while s.accepted and s.accepted[0] <= now - 1.0:
                s.accepted.popleft()
            if len(s.accepted) >= s.a.rps:
                st["rate_limited_429"] += 1
                s.rejects.append(now)
                while s.rejects and s.rejects[0] <= now - 10.0:
                    s.rejects.popleft()
                if len(s.rejects) > 3 * s.a.rps:
                    s.ban_until, _ = now + s.a.ban_seconds, s.rejects.clear()
                return "rate"
            s.accepted.append(now)
            return None

    def check_auth(s, hdr):
        if not hdr or not hdr.startswith("Bearer "):
            return False
        tok = hdr[7:].strip()
        if tok == s.a.long_lived_token:
            return True
        with s.lock:
            return s.access.get(tok, 0) > time.time()

    def pick_fault(s):
        with s.lock:
            if s.fault_rate <= 0 or s.frng.random() >= s.fault_rate:
                return None
            s.stats["faults_injected"] += 1
            return s.frng.choice(["500", "502", "503", "drop", "malformed", "401"])

    # ---------- OAuth ----------
    def oauth(s, p):
        def err(status, hint, title="Некорректный запрос",
                detail="В запросе отсутствует ряд параметров или параметры невалидны"):
            s.stats["refresh_rejected"] += 1
            return status, {"hint": hint, "title": title, "status": status, "detail": detail,
                            "type": "https://developers.amocrm.ru/v3/errors/OAuthProblemJson"}
        with s.lock:
            for k in ("client_id", "client_secret", "grant_type", "redirect_uri"):
                if not p.get(k):
                    return err(400, "Check the `%s` parameter" % k)
            if p["client_id"] != s.a.client_id or p["client_secret"] != s.a.client_secret:
                return err(401, "Client authentication failed", "Unauthorized", "Client authentication failed")
            if p["grant_type"] == "authorization_code":
                return err(400, "Cannot decrypt the authorization code" if p.get("code") else "Check the `code` parameter")
            if p["grant_type"] != "refresh_token":
                return err(400, "The authorization grant type is not supported by the authorization server.")
            old = p.get("refresh_token")
            if not old:
                return err(400, "Check the `refresh_token` parameter")
            rec = s.rts.get(old)
            if rec is None:
                return err(400, "Cannot decrypt the refresh token")
            if rec["revoked"] or (not s.a.refresh_grace and rec["succ"] is not None):
                return err(400, "Token has been revoked")
            if rec["succ"] is not None:            # grace re-use: drop the never-used successor
                s.rts[rec["succ"]]["revoked"] = True
            if rec["parent"] is not None:          # this token is the "new one": revoke its parent
                s.rts[rec["parent"]]["revoked"] = True
            at, rt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + secrets.token_urlsafe(48), "def50200" + secrets.token_hex(64)
            s.access[at] = time.time() + s.a.token_ttl
            s.rts[rt] = {"revoked": False, "parent": old, "succ": None}
            rec["succ"] = rt
            s.stats["refreshes"] += 1
            return 200, {"token_type": "Bearer", "expires_in": s.a.token_ttl, "server_time": int(time.time()),
                         "access_token": at, "refresh_token": rt}

    # ---------- validation ----------
    def validate(s, e, patch, admin=False):
        errs, ch = [], {}

        def err(code, path, detail=None):
            errs.append({"code": code, "path": path, "detail": detail or DET[code]})
            return True
        if not isinstance(e, dict):
            err("InvalidType", "", "This value should be of type object.")
            return ch, errs
        if patch:
            cid = e.get("id")
            if cid is None:
                err("FieldMissing", "id")
            elif not is_int(cid):
                err("InvalidType", "id", "This value should be of type int.")
            elif cid not in s.companies or (s.companies[cid]["is_deleted"] and not admin):
                err("NotFound", "id")
            else:
                ch["id"] = cid
            for k in () if admin else ("created_by", "updated_by"):
                if k in e:
                    err("FieldNotExpected", k)
        if "name" in e:
            if not isinstance(e["name"], str):
                err("InvalidType", "name", "This value should be of type string.")
            elif len(e["name"]) > 255:
                err("InvalidValue", "name", "This value is too long. It should have 255 characters or less.")
            else:
                ch["name"] = e["name"]
        for k in ("responsible_user_id",) + (() if patch else ("created_by", "updated_by")):
            if k in e:
                if not is_int(e[k]):
                    err("InvalidType", k, "This value should be of type int.")
                elif e[k] not in USERS and not (k != "responsible_user_id" and e[k] == 0):
                    err("NotSupportedChoice", k)
                else:
                    ch[k] = e[k]
        for k in ("created_at", "updated_at"):
            if k in e:
                if not is_int(e[k]) or e[k] < 0:
                    err("InvalidType", k, "This value should be of type int.")
                else:
                    ch[k] = e[k]
        if admin and "is_deleted" in e:
            ch["is_deleted"] = bool(e["is_deleted"])
        cfv = e.get("custom_fields_values")
        if cfv is not None:
            if not isinstance(cfv, list):
                err("InvalidType", "custom_fields_values", "This value should be of type array.")
            else:
                ch["cf"] = s.validate_cf(cfv, err)
        emb = e.get("_embedded")
        if isinstance(emb, dict) and "tags" in emb:
            ch["tags"] = s.validate_tags(emb["tags"], "_embedded.tags", err, True)
        elif emb is not None and not isinstance(emb, dict):
            err("InvalidType", "_embedded", "This value should be of type object.")
        for k in ("tags_to_add", "tags_to_delete"):
            if k in e:
                ch[k] = s.validate_tags(e[k], k, err, False)
        return ch, errs

    def validate_tags(s, tags, path, err, nullable):
        if tags is None and nullable:
            return []
        if not isinstance(tags, list):
            err("InvalidType", path, "This value should be of type array.")
            return []
        for i, t in enumerate(tags):
            if not isinstance(t, dict) or not (is_int(t.get("id")) or isinstance(t.get("name"), str) and t["name"]):
                err("FieldMissing", "%s.%d.name" % (path, i))
            elif is_int(t.get("id")) and t["id"] not in s.tags and not t.get("name"):
                err("NotFound", "%s.%d.id" % (path, i), "Tag not found")
        return tags

    def validate_cf(s, cfv, err):
        out = {}
        for i, fv in enumerate(cfv):
            p = "custom_fields_values.%d" % i
            if not isinstance(fv, dict):
                err("InvalidType", p, "This value should be of type object.")
                continue
            if "field_id" in fv:
                f, kp = F_BY_ID.get(fv["field_id"]) if is_int(fv["field_id"]) else None, p + ".field_id"
            elif "field_code" in fv:
                f, kp = F_BY_CODE.get(str(fv["field_code"]).upper()), p + ".field_code"
            else:
                err("FieldMissing", p + ".field_id")
                continue
            if f is None:
                err("NotSupportedChoice", kp)
                continue
            if "values" not in fv or fv["values"] is None:
                if "values" in fv:
                    out[f["id"]] = None          # "values": null clears the field
                else:
                    err("FieldMissing", p + ".values")
                continue
            if not isinstance(fv["values"], list):
                err("InvalidType", p + ".values", "This value should be of type array.")
                continue
            res, bad, typ = [], False, f["type"]
            enums = {e["value"]: e["id"] for e in f["enums"] or []}
            for j, v in enumerate(fv["values"]):
                vp = "%s.values.%d" % (p, j)
                val = v.get("value") if isinstance(v, dict) else None
                code = v.get("enum_code", v.get("enum")) if isinstance(v, dict) else None
                sval = val if isinstance(val, str) else None
                if not isinstance(v, dict):
                    bad = err("InvalidType", vp, "This value should be of type object.")
                elif f["enums"] and v.get("enum_id") is not None and v["enum_id"] not in enums.values():
                    bad = err("NotSupportedChoice", vp + ".enum_id")
                elif typ == "select":
                    eid = v.get("enum_id") or enums.get(sval)
                    if eid:
                        res.append({"value": ENUM_VAL[eid], "enum_id": eid})
                    elif val not in ("", None):
                        bad = err("NotSupportedChoice", vp + ".value")
                elif val is None or val == "":
                    continue                     # an empty string does not clear a field
                elif typ == "numeric" and not (is_int(val) or isinstance(val, float) or
                                               sval and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", sval)):
                    bad = err("InvalidType", vp + ".value", "This value should be of type numeric.")
                elif not (sval is not None or is_int(val) or isinstance(val, float)):
                    bad = err("InvalidType", vp + ".value", "This value should be of type string.")
                elif typ == "multitext" and v.get("enum_id") is None and code is not None and code not in enums:
                    bad = err("NotSupportedChoice", vp + ".enum_code")
                else:
                    item = {"value": str(val).strip() if typ == "numeric" else str(val)}
                    if typ == "multitext":
                        item["enum_id"] = v.get("enum_id") or enums.get(code) or f["enums"][0]["id"]
                    res.append(item)
            if not bad and typ != "multitext" and len(res) > 1:
                bad = err("InvalidValue", p + ".values", "This field accepts a single value.")
            if not bad and res:
                out[f["id"]] = res
        return out

    def apply(s, c, ch, now, user):
        for k in ("name", "responsible_user_id", "created_by", "created_at", "is_deleted"):
            if k in ch:
                c[k] = ch[k]
        for fid, vals in ch.get("cf", {}).items():
            if vals is None:
                c["cf"].pop(fid, None)
            else:
                c["cf"][fid] = vals
        if "tags" in ch:
            c["tags"] = [s.tag(t) for t in ch["tags"]]
        for t in ch.get("tags_to_add", []):
            t = s.tag(t)
            if t not in c["tags"]:
                c["tags"].append(t)
        for t in ch.get("tags_to_delete", []):
            c["tags"] = [x for x in c["tags"] if x["id"] != t.get("id") and x["name"] != t.get("name")]
        c["updated_by"] = ch.get("updated_by", user)
        c["updated_at"] = ch.get("updated_at", max(now, c["created_at"]))

    def write(s, items, patch, base):
        """Validate all, then store all. Returns (status, body)."""
        if not isinstance(items, list) or not items:
            return 400, problem(400, "Bad Request", "Request body must be a non-empty array")
        if len(items) > 250:
            return 422, problem(422, "Unprocessable Entity", "Maximum 250 entities per request")
        with s.lock:
            verrs, changes = [], []
            for i, e in enumerate(items):
                ch, errs = s.validate(e, patch)
                rid = str(e.get("request_id", i)) if isinstance(e, dict) else str(i)
                changes.append((rid, ch))
                if errs:
                    verrs.append({"request_id": rid, "errors": errs})
            if verrs:
                s.stats["validation_400"] += 1
                b = problem(400, "Bad Request", "Request validation failed")
                b["validation-errors"] = verrs
                return 400, b
            now, out = int(time.time()), []
            for rid, ch in changes:
                if patch:
                    c = s.companies[ch["id"]]
                    s.apply(c, ch, now, API_USER)
                    s.stats["companies_patched"] += 1
                    out.append({"id": c["id"], "name": c["name"], "updated_at": c["updated_at"], "request_id": rid,
                                "_links": {"self": {"href": "%s/api/v4/companies/%d" % (base, c["id"])}}})
                else:
                    c = s.new_company(s.rng, ch.get("created_at", now), ch.get("name", ""), {},
                                      ch.get("responsible_user_id", API_USER))
                    s.apply(c, ch, now, ch.get("updated_by", API_USER))
                    s.stats["companies_created"] += 1
                    out.append({"id": c["id"], "request_id": rid,
                                "_links": {"self": {"href": "%s/api/v4/companies/%d" % (base, c["id"])}}})
            return 200, {"_links": {"self": {"href": base + "/api/v4/companies"}}, "_embedded": {"companies": out}}

    # ---------- listing ----------
    def list_companies(s, q, base):
        def one(k, d=None):
            return q[k][0] if k in q else d
        try:
            page = max(1, int(one("page", "1")))
            limit = int(one("limit", "50"))
        except ValueError:
            return 400, problem(400, "Bad Request", "page and limit must be integers")
        limit = 50 if limit < 1 else min(limit, 250)
        with_ = set(x.strip() for v in q.get("with", []) for x in v.split(","))
        filt = {} if s.a.api_filter_disabled else {k: v for k, v in q.items() if k.startswith("filter[")}
        try:
            ids = set(int(x) for k, v in filt.items() if re.fullmatch(r"filter\[id\](\[\d*\])?", k)
                      for x in v for x in x.split(",") if x != "")
            rng = {}
            for fld in ("updated_at", "created_at"):
                lo, hi = filt.get("filter[%s][from]" % fld), filt.get("filter[%s][to]" % fld)
                eq = filt.get("filter[%s]" % fld)
                rng[fld] = (int(lo[0]) if lo and lo[0] else None, int(hi[0]) if hi and hi[0] else None,
                            int(eq[0]) if eq and eq[0] else None)
        except ValueError:
            return 400, problem(400, "Bad Request", "Invalid filter value")
        names = set(v for k, vs in filt.items() if re.fullmatch(r"filter\[name\](\[\d*\])?", k) for v in vs)
        query = (one("query") or "").strip().lower()
        qdigits = re.sub(r"\D", "", query) if re.fullmatch(r"[\d\s()+\-.]{5,}", query) else ""
        okey, odir = "id", "asc"
        for k in ("order[updated_at]", "order[created_at]", "order[id]"):
            if k in q and q[k][0].lower() in ("asc", "desc"):
                okey, odir = k[6:-1], q[k][0].lower()
                break
        with s.lock:
            deleted = "only_deleted" in with_
            rows = []
            for c in s.companies.values():
                if c["is_deleted"] != deleted or (ids and c["id"] not in ids) or (names and c["name"] not in names):
                    continue
                ok = True
                for fld, (lo, hi, eq) in rng.items():
                    v = c[fld]
                    if (lo is not None and v < lo) or (hi is not None and v > hi) or (eq is not None and v != eq):
                        ok = False
                if ok and query:
                    vals = [v["value"] for vs in c["cf"].values() for v in vs]
                    hay = " ".join([c["name"] or ""] + vals).lower()
                    ok = query in hay or (qdigits and any(qdigits in re.sub(r"\D", "", x) for x in vals))
                if ok:
                    rows.append(c)
            rows.sort(key=lambda c: (c[okey], c["id"]), reverse=(odir == "desc"))
            chunk = rows[(page - 1) * limit: page * limit]
            items = [s.render(c, base, with_) for c in chunk]
        if not items:
            return 204, None
        pairs = [(k, v) for k, vs in q.items() if k != "page" for v in vs]

        def href(p):
            return "%s/api/v4/companies?%s" % (base, urlencode(pairs + [("page", p)], safe="[],"))
        links = {"self": {"href": href(page)}}
        if len(items) == limit:
            links["next"] = {"href": href(page + 1)}
        if page > 1:
            links["prev"] = {"href": href(page - 1)}
        return 200, {"_page": page, "_links": links, "_embedded": {"companies": items}}

    def custom_fields(s, q, base, fid=None):
        def model(f):
            return {"id": f["id"], "name": f["name"], "type": f["type"], "account_id": ACCOUNT_ID,
                    "code": f["code"], "sort": 500 + FIELDS.index(f), "is_api_only": False,
                    "enums": [dict(e) for e in f["enums"]] if f["enums"] else None, "group_id": None,
                    "required_statuses": [], "is_deletable": f["code"] is None, "is_predefined": f["code"] is not None,
                    "entity_type": "companies", "remind": None,
                    "_links": {"self": {"href": "%s/api/v4/companies/custom_fields/%d" % (base, f["id"])}}}
        if fid is not None:
            return (200, model(F_BY_ID[fid])) if fid in F_BY_ID else (204, None)
        try:
            page, limit = max(1, int(q.get("page", ["1"])[0])), min(50, max(1, int(q.get("limit", ["50"])[0])))
        except ValueError:
            return 400, problem(400, "Bad Request", "page and limit must be integers")
        chunk = FIELDS[(page - 1) * limit: page * limit]
        if not chunk:
            return 204, None
        pc = (len(FIELDS) + limit - 1) // limit
        links = {"self": {"href": "%s/api/v4/companies/custom_fields?page=%d&limit=%d" % (base, page, limit)}}
        if page < pc:
            links["next"] = {"href": "%s/api/v4/companies/custom_fields?page=%d&limit=%d" % (base, page + 1, limit)}
        return 200, {"_total_items": len(FIELDS), "_page": page, "_page_count": pc, "_links": links,
                     "_embedded": {"custom_fields": [model(f) for f in chunk]}}

    # ---------- background mutator / admin ----------
    def mutate_random(s):
        with s.lock:
            r, now = s.rng, int(time.time())
            s.stats["mutations"] += 1
            live = [c for c in s.companies.values() if not c["is_deleted"]]
            user = r.choice(USERS)
            if not live or r.random() < 0.1:
                name = s.gen_name(r)
                s.new_company(r, now, name, s.gen_cf(r, name), user)
                return
            c = r.choice(live)
            kind = r.choice(["name", "phone", "email", "employees", "revenue", "city", "industry", "user"])
            if kind == "name":
                c["name"] = re.sub(r" \(\d+\)$", "", c["name"] or "") + " (%d)" % r.randint(2, 99)
            elif kind == "phone":
                c["cf"][F["Phone"]] = [{"value": "+1 212 555 %04d" % r.randint(0, 9999), "enum_id": r.choice([1001, 1003])}]
            elif kind == "email":
                c["cf"][F["Email"]] = [{"value": "sales%d@example.org" % r.randint(1, 999), "enum_id": 1011}]
            elif kind == "employees":
                c["cf"][F["Employees"]] = [{"value": str(r.randint(1, 20000))}]
            elif kind == "revenue":
                c["cf"][F["Annual revenue"]] = [{"value": str(r.randint(10, 90000) * 1000)}]
            elif kind == "city":
                country, city = r.choice(PLACES)
                c["cf"][F["Country"]], c["cf"][F["City"]] = [{"value": country}], [{"value": city}]
            elif kind == "industry":
                e = r.choice(F_BY_ID[F["Industry"]]["enums"])
                c["cf"][F["Industry"]] = [{"value": e["value"], "enum_id": e["id"]}]
            else:
                c["responsible_user_id"] = r.choice(USERS)
            c["updated_at"], c["updated_by"] = max(now, c["created_at"]), user

    def mutator(s):
        while True:
            time.sleep(1.0 / s.a.mutations_per_second)
            s.mutate_random()

    def admin_mutate(s, body, base):
        if not isinstance(body, dict):
            return 400, problem(400, "Bad Request", "object expected")
        with s.lock:
            now, user = int(time.time()), s.rng.choice(USERS)
            if body.get("id") is None:
                ch, errs = s.validate(body, False, admin=True)
                if errs:
                    return 400, {"validation-errors": [{"request_id": "0", "errors": errs}]}
                c = s.new_company(s.rng, now, ch.get("name", ""), {}, user)
            else:
                ch, errs = s.validate(body, True, admin=True)
                if errs:
                    return 400, {"validation-errors": [{"request_id": "0", "errors": errs}]}
                c = s.companies[ch["id"]]
            ch.pop("updated_by", None)
            s.apply(c, ch, now, user)
            s.stats["mutations"] += 1
            return 200, s.render(c, base) | {"is_deleted": c["is_deleted"]}


def problem(status, title, detail):
    return {"title": title, "type": "https://httpstatus.es/%d" % status, "status": status, "detail": detail}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    sys_version = ""
    S = None

    def log_message(self, fmt, *args):
        if self.S.a.verbose:
            super().log_message(fmt, *args)

    def send(self, status, body=None, ctype="application/hal+json", raw=None):
        data = raw if raw is not None else (b"" if body is None else json.dumps(body, ensure_ascii=False).encode())
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", ctype + ("" if ctype.startswith("text/html") else "; charset=utf-8"))
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if status != 204 and self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self): self.dispatch("GET")
    def do_POST(self): self.dispatch("POST")
    def do_PATCH(self): self.dispatch("PATCH")
    def do_PUT(self): self.dispatch("PUT")
    def do_DELETE(self): self.dispatch("DELETE")

    def dispatch(self, method):
        S = self.S
        u = urlsplit(self.path)
        path = u.path.rstrip("/") or "/"
        q = parse_qs(u.query, keep_blank_values=True)
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n > 0 else b""
        base = "http://" + (self.headers.get("Host") or "127.0.0.1:%d" % S.a.port)
        if path.startswith("/__admin"):
            return self.admin(method, path, raw, base)
        g = S.gate()
        if g == "ban":
            return self.send(403, raw=HTML403.encode(), ctype="text/html")
        if g == "rate":
            if S.a.html_429_fraction and S.frng.random() < S.a.html_429_fraction:
                return self.send(429, raw=html(429, "Too Many Requests").encode(), ctype="text/html")
            b = problem(429, "Too Many Requests", "Too many requests")
            b["retry_after"] = 1
            return self.send(429, b, "application/problem+json")
        if path == "/oauth2/access_token":
            if method != "POST":
                return self.send(405, problem(405, "Method Not Allowed", "Use POST"), "application/problem+json")
            try:
                if "json" in (self.headers.get("Content-Type") or "") or raw.strip().startswith(b"{"):
                    p = json.loads(raw or b"{}")
                else:
                    p = {k: v[0] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
                p = {k: (str(v) if v is not None else None) for k, v in p.items()}
            except (ValueError, AttributeError):
                p = {}
            st, body = S.oauth(p)
            return self.send(st, body, "application/json" if st == 200 else "application/problem+json")
        if not path.startswith("/api/v4/"):
            return self.send(404, problem(404, "Not Found", "Not found"), "application/problem+json")
        if not S.check_auth(self.headers.get("Authorization")):
            with S.lock:
                S.stats["unauthorized_401"] += 1
            return self.send(401, problem(401, "Unauthorized", "Invalid or expired access token"),
                             "application/problem+json")
        fault = S.pick_fault()
        if fault and (method == "GET" and fault != "malformed" or method != "GET" and not S.fault_commit):
            return self.fault(fault, base)            # no side effects
        st, body = self.route(method, path, q, raw, base)
        if fault and fault != "malformed":            # write committed, then the failure
            return self.fault(fault, base)
        if fault == "malformed":
            data = json.dumps(body if body is not None else {"_page": 1}, ensure_ascii=False).encode()
            return self.send(200, raw=data[: max(1, len(data) // 2)])
        ctype = "application/hal+json" if st < 400 else "application/problem+json"
        return self.send(st, body, ctype)

    def fault(self, kind, base):
        if kind == "drop":
            self.close_connection = True
            return
        if kind == "500":
            return self.send(500, problem(500, "Internal Server Error", "Internal error"), "application/problem+json")
        if kind in ("502", "503"):
            code = int(kind)
            return self.send(code, raw=html(code, "Bad Gateway" if code == 502 else "Service Temporarily Unavailable").encode(),
                             ctype="text/html")
        if kind == "malformed":
            return self.send(200, raw=('{"_links":{"self":{"href":"%s/api/v4/companies"}},"_embedded":{"compan' % base).encode())
        with self.S.lock:
            self.S.stats["unauthorized_401"] += 1
        return self.send(401, problem(401, "Unauthorized", "Access token has expired"), "application/problem+json")

    def route(self, method, path, q, raw, base):
        S = self.S
        with_ = set(x.strip() for v in q.get("with", []) for x in v.split(","))
        if path == "/api/v4/account" and method == "GET":
            b = {"id": ACCOUNT_ID, "name": "Example", "subdomain": "example", "current_user_id": API_USER,
                 "country": "US", "currency": "USD", "_links": {"self": {"href": base + "/api/v4/account"}}}
            if "is_api_filter_enabled" in with_:
                b["is_api_filter_enabled"] = not S.a.api_filter_disabled
            return 200, b
        m = re.fullmatch(r"/api/v4/companies/custom_fields(?:/(\d+))?", path)
        if m:
            if method != "GET":
                return 405, problem(405, "Method Not Allowed", "Read-only in this server")
            return S.custom_fields(q, base, int(m.group(1)) if m.group(1) else None)
        if path == "/api/v4/companies":
            if method == "GET":
                return S.list_companies(q, base)
            if method in ("POST", "PATCH"):
                try:
                    items = json.loads(raw)
                except ValueError:
                    return 400, problem(400, "Bad Request", "Invalid JSON body")
                return S.write(items, method == "PATCH", base)
            return 405, problem(405, "Method Not Allowed", "Method not allowed")
        m = re.fullmatch(r"/api/v4/companies/(\d+)", path)
        if m:
            cid = int(m.group(1))
            if method == "GET":
                with S.lock:
                    c = S.companies.get(cid)
                    return (204, None) if c is None or c["is_deleted"] else (200, S.render(c, base, with_))
            if method == "PATCH":
                try:
                    e = json.loads(raw)
                except ValueError:
                    return 400, problem(400, "Bad Request", "Invalid JSON body")
                if not isinstance(e, dict):
                    return 400, problem(400, "Bad Request", "Request body must be an object")
                st, b = S.write([dict(e, id=cid)], True, base)
                if st == 200:
                    b = b["_embedded"]["companies"][0]
                    b.pop("request_id", None)
                return st, b
            return 405, problem(405, "Method Not Allowed", "Method not allowed")
        return 404, problem(404, "Not Found", "Not found")

    def admin(self, method, path, raw, base):
        S = self.S
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return self.send(400, {"error": "invalid json"}, "application/json")
        if method == "GET" and path == "/__admin/companies":
            with S.lock:
                out = [S.render(c, base) | ({"name": c["name"], "custom_fields_values": S.render_cf(c),
                                             "created_at": c["created_at"]} if c["is_deleted"] else {})
                       for c in sorted(S.companies.values(), key=lambda c: c["id"])]
            return self.send(200, out, "application/json")
        if method == "GET" and path == "/__admin/stats":
            with S.lock:
                st = dict(S.stats, banned_now=time.monotonic() < S.ban_until, fault_rate=S.fault_rate,
                          companies=len(S.companies))
            return self.send(200, st, "application/json")
        if method == "POST" and path == "/__admin/mutate":
            st, b = S.admin_mutate(body, base)
            return self.send(st, b, "application/json")
        if method == "POST" and path == "/__admin/faults":
            with S.lock:
                S.fault_rate = float(body.get("rate", 0) or 0)
                S.fault_commit = bool(body.get("commit_before_fault", False))
            return self.send(200, {"rate": S.fault_rate, "commit_before_fault": S.fault_commit}, "application/json")
        if method == "POST" and path == "/__admin/unban":
            with S.lock:
                S.ban_until = 0.0
                S.rejects.clear()
            return self.send(200, {"banned": False}, "application/json")
        return self.send(404, {"error": "unknown admin endpoint"}, "application/json")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def main():
    ap = argparse.ArgumentParser(description="amoCRM v4 companies mock")
    ap.add_argument("--port", type=int, default=9703)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--client-secret", required=True)
    ap.add_argument("--refresh-token", required=True)
    ap.add_argument("--long-lived-token", default=None)
    ap.add_argument("--companies", type=int, default=500)
    ap.add_argument("--rps", type=int, default=7)
    ap.add_argument("--token-ttl", type=int, default=86400)
    ap.add_argument("--mutations-per-second", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ban-seconds", type=float, default=60.0)
    ap.add_argument("--html-429-fraction", type=float, default=0.0)
    ap.add_argument("--no-refresh-grace", dest="refresh_grace", action="store_false")
    ap.add_argument("--api-filter-disabled", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    Handler.S = S = State(a)
    if a.mutations_per_second > 0:
        threading.Thread(target=S.mutator, daemon=True).start()
    srv = Server(("127.0.0.1", a.port), Handler)
    print("amoCRM mock on http://127.0.0.1:%d (%d companies)" % (a.port, len(S.companies)), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
