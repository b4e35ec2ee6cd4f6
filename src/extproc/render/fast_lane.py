"""The fast lane in Envoy's config (``core/fast_lane.py`` says which models and why): two
request filters, and the routes they lead to.

- The *reading* route matches requests the lane may serve by their headers alone (a fast path,
  a JSON body no larger than ``envoy.fast_lane_max_bytes``); every other route turns the two
  filters off, so Envoy never parses any other body.
- ``json_to_metadata`` puts the body's ``model``, ``stream``, ``tool_choice`` (or its
  ``type``) and ``stream_options.include_usage`` into metadata.
- The Lua decides: a fast model, a path its backend speaks, no hint header, nothing but text
  in the body's parts, none of the keys that need the service, one plain ``model`` key; then
  it writes the backend's name for the model into that key (a model served by another name)
  and sets the metadata the route stage would have set (the endpoint, the names for the
  response headers and Envoy's errors) and clears the route cache.
- The *fast* routes (one per silence limit, and one for whole answers) match that metadata,
  remove the headers the route stage would have removed (a client's x-envoy-* and x-extproc-*
  are gone on arrival: ``bootstrap.early_header_mutation``) and send the request to the direct
  cluster. The route stage's filter is made only for a request without the lane's mark
  (``unless_fast``). A request the Lua turned down stays on the reading route, which is the
  ordinary one: the route stage decides.

With ``envoy.fast_lane_compiled`` the two filters are one, ``lane/lane.c`` (an Envoy dynamic
module) taking the same rules as lines of text (``module_config``), and the same module takes
the response Lua's place (``module_filter``); the routes are the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..config import Config
from ..contract import (
    META_NS,
    OWN_RESPONSE_HEADERS,
    RESP_ATTEMPTS,
    RESP_BACKEND,
    RESP_MODEL,
    Cluster,
    Meta,
)
from ..core.backends import CLIENT_CREDENTIAL_HEADERS
from ..core.fast_lane import (
    ASKS,
    FREE_CHOICES,
    OWN_MARKS,
    OWN_TYPES,
    PATHS,
    TYPED_CHOICE,
    TYPES,
    Lane,
    json_escaped,
    lanes,
    marks,
    plain_metadata,
    record_socket,
)
from ..lane.build import MODULE
from .common import dur

BODY_NS = "extproc.body"  # what json_to_metadata read
READ_FILTER = "extproc.fast.read"
DECIDE_FILTER = "extproc.fast.decide"
LANE_FILTER = "extproc.fast.lane"  # compiled: the two above and more, in one (lane/lane.c)
RESPONSES_FILTER = "extproc.responses"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"

_LUA = """
local NS, BODY, USAGE = "@NS@", "@BODY@", @USAGE@
local LANES = {@LANES@}
local HINTS = {@HINTS@}     -- present: the route stage decides
-- (core/fast_lane.py says what each of these is)
local TYPES = {@TYPES@}
local MESSAGES = "@MESSAGES@"
local OWN_TYPES = {@OWN_TYPES@}
local OWN_MARKS = {@OWN_MARKS@}
local ASKS = {@ASKS@}
local CHOICES = {@CHOICES@}
local META_KEY = @META@  -- the one metadata key passed on untouched (hints are the service's)
local MARKS = {@MARKS@}

function envoy_on_request(handle)
  local meta = handle:streamInfo():dynamicMetadata()
  local j = meta:get(BODY)
  if j == nil then return end
  local lane = LANES[j.model]
  if lane == nil then return end
  local headers = handle:headers()
  local path = headers:get(":path")
  if headers:get(":method") ~= "POST" or not lane.paths[path] then return end
  for _, h in ipairs(HINTS) do
    if headers:get(h) ~= nil then return end
  end
  local stream = j.stream == true
  -- A stream whose client did not ask for its usage: asked for here (no other stream option:
  -- the ext_proc path merges them), its chunk dropped by the response Lua
  local add_usage = stream and USAGE and j.usage ~= true and ASKS[path]
  local body = handle:body()
  if body == nil then return end
  local text = body:getBytes(0, body:length())
  local own, own_marks = OWN_TYPES[path] or {}, OWN_MARKS[path] or {}
  for _, m in ipairs(MARKS) do
    if not own_marks[m] and string.find(text, m, 1, true) then return end
  end
  -- One model key, as the route stage would make it: a second one (any case), or a key with
  -- a letter escaped (as \\u006d), could make the backend read another model.
  local lower = string.lower(text)
  local first = string.find(lower, '"model"', 1, true)
  if first == nil or string.find(lower, '"model"', first + 7, true)
     or string.find(text, "\\\\u00[46]") then return end
  -- A tool_choice forcing nothing, in one key (a second one could be the one a backend reads)
  local choice = string.find(lower, '"tool_choice"', 1, true)
  local tc = j.tool_choice
  if path == MESSAGES then tc = j.choice_type end  -- (TYPED_CHOICE: an object, by its type)
  if choice and (not CHOICES[tc]
                 or string.find(lower, '"tool_choice"', choice + 13, true)) then return end
  -- metadata: only {"<META_KEY>": "<at most 512 plain characters>"}, in one key
  local md = string.find(lower, '"metadata"', 1, true)
  if md then
    if not (META_KEY and lane.metadata) or string.find(lower, '"metadata"', md + 10, true)
    then return end
    local v = string.match(text, '^%s*:%s*{%s*"' .. META_KEY .. '"%s*:%s*"([^"\\\\]*)"%s*}',
                           md + 10)
    if v == nil or #v > 512 then return end
  end
  for t in string.gmatch(text, '"type"%s*:%s*"([^"]*)"') do
    if not (TYPES[t] or own[t]) then return end
  end
  if add_usage and string.find(lower, '"stream_options"', 1, true) then return end
  -- (objects fetched before a yield, as body() is, are out of scope after it)
  if lane.served then  -- served by another name: spliced in as the model key's value
    local _, stop, raw = string.find(text, '^%s*:%s*"([^"\\\\]*)"', first + 7)
    if raw ~= j.model then return end
    text = string.sub(text, 1, first + 6) .. ':"' .. lane.served .. '"' ..
      string.sub(text, stop + 1)
  end
  if add_usage then  -- (the object has a member: the model)
    local _, open = string.find(text, "^%s*{")
    if open == nil then return end
    text = '{"stream_options":{"include_usage":true},' .. string.sub(text, open + 1)
  end
  meta = handle:streamInfo():dynamicMetadata()
  if lane.served or add_usage then
    body:setBytes(text)
    headers = handle:headers()
    headers:replace("content-length", tostring(#text))
    if add_usage then  -- (the response Lua reads its events: uncompressed)
      headers:remove("accept-encoding")
      meta:set(NS, "@ADDED@", "1")
    end
  end
  meta:set(NS, "@HOSTS@", lane.hosts)
  meta:set(NS, "@PUBLIC@", lane.public or j.model)
  if lane.public then meta:set(NS, "@REQUESTED@", j.model) end  -- (an alias)
  meta:set(NS, "@BACKEND@", lane.backend)
  meta:set(NS, "@MODEL@", lane.served or j.model)
  meta:set(NS, "@FAST@", stream and lane.idle or "0")
  handle:clearRouteCache()
end
"""


def _lua(text: str) -> str:
    """A Lua string literal (names come from the operator's config, but a quote in one must
    not end the script)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _lua_strings(items: list[str]) -> str:
    return ", ".join(map(_lua, items))


def removed(cfg: Config) -> list[str]:
    """What the fast routes remove from a request, as the route stage would have: credentials
    (no fast backend has a key of its own or gets the client's), what the config strips, the
    intent and propagated hint headers."""
    h = cfg.hints
    return list(dict.fromkeys([*CLIENT_CREDENTIAL_HEADERS, *cfg.strip_client_headers,
                               *(b.auth_header for b in cfg.backends), *h.propagate,
                               *([h.intent_header] if h.intent_header else [])]))


def hint_headers(cfg: Config) -> list[str]:
    """The request headers whose presence sends a request to the route stage (hints)."""
    h = cfg.hints
    return [n for n in h.headers.model_dump().values() if n] if h.headers_enabled else []


def _lua_set(items: Iterable[str]) -> str:
    return ", ".join(f"[{_lua(i)}] = true" for i in items)


def decide_lua(cfg: Config, fast: dict[str, Lane]) -> str:
    entries = []
    for name, lane in fast.items():
        paths = ", ".join(f'[{_lua(p)}] = true' for p in lane.paths)
        served = f"served = {_lua(lane.served)}, " if lane.served != name else ""
        public = f"public = {_lua(lane.public)}, " if lane.public != name else ""
        metadata = "metadata = true, " if lane.metadata else ""
        entries.append(f'[{_lua(name)}] = {{hosts = {_lua(lane.address)}, backend = '
                       f'{_lua(lane.backend)}, {served}{public}{metadata}idle = '
                       f'"{lane.idle_ms}", paths = {{{paths}}}}}')
    out = _LUA
    meta_key = plain_metadata(cfg)
    for key, value in {"@NS@": META_NS, "@BODY@": BODY_NS,
                       "@CHOICES@": _lua_set(FREE_CHOICES), "@TYPES@": _lua_set(TYPES),
                       "@MESSAGES@": TYPED_CHOICE[0], "@ASKS@": _lua_set(ASKS),
                       "@OWN_TYPES@": ", ".join(f"[{_lua(p)}] = {{{_lua_set(v)}}}"
                                                for p, v in OWN_TYPES.items()),
                       "@OWN_MARKS@": ", ".join(f"[{_lua(p)}] = {{{_lua_set(v)}}}"
                                                for p, v in OWN_MARKS.items()),
                       "@META@": _lua(meta_key) if meta_key else "nil",
                       "@USAGE@": "true" if cfg.envoy.token_usage else "false",
                       "@LANES@": ",\n  ".join(entries),
                       "@HINTS@": _lua_strings(hint_headers(cfg)),
                       "@MARKS@": _lua_strings(marks(cfg)), "@HOSTS@": Meta.HOSTS,
                       "@PUBLIC@": Meta.PUBLIC_MODEL, "@BACKEND@": Meta.BACKEND,
                       "@MODEL@": Meta.MODEL, "@FAST@": Meta.FAST,
                       "@ADDED@": Meta.USAGE_ADDED, "@REQUESTED@": Meta.REQUESTED}.items():
        out = out.replace(key, value)
    return out


def _present(key: str, *path: str) -> dict[str, Any]:
    return {"selectors": [{"key": k} for k in path or (key,)],
            "on_present": {"metadata_namespace": BODY_NS, "key": key,
                           "type": "PROTOBUF_VALUE"}}


def compiled(cfg: Config) -> bool:
    """Whether the lane is the compiled module (and there is a lane at all). Rendering alone
    cannot know where Envoy runs, so ``auto`` is Lua here; ``extproc up`` settles it first
    (``lane.build.choose``)."""
    return cfg.envoy.fast_lane_compiled is True and bool(lanes(cfg)[0])


def module_config(cfg: Config, fast: dict[str, Lane]) -> str:
    """The compiled lane's rules, one per line (lane/lane.c reads them): the same lists the
    Lua is rendered from. Names that JSON would escape, or that hold a tab or newline, never
    match a body read raw: such a lane is left out (its requests take the ext_proc path)."""
    def plain(*names: str) -> bool:
        return all(not json_escaped(n) and "\t" not in n and "\n" not in n for n in names)

    meta_key = plain_metadata(cfg)
    lines = [["ns", META_NS],
             ["keys", Meta.HOSTS, Meta.PUBLIC_MODEL, Meta.REQUESTED, Meta.FAST,
              Meta.USAGE_ADDED, Meta.USAGE_IN, Meta.USAGE_OUT, Meta.FIRST_TOKEN_US, Meta.LAST_US],
             ["usage", str(int(cfg.envoy.token_usage))],
             ["hold", str(int(cfg.envoy.whole_responses))],
             ["max", str(cfg.envoy.fast_lane_max_bytes)],
             *([["meta", meta_key]] if meta_key else []),
             ["client", cfg.hints.client_header], ["answer", RESP_BACKEND, RESP_MODEL, RESP_ATTEMPTS],
             ["strip", *OWN_RESPONSE_HEADERS],
             *(["hint", h] for h in hint_headers(cfg)), *(["mark", m] for m in marks(cfg)),
             *(["type", t] for t in TYPES), *(["choice", c] for c in FREE_CHOICES),
             *([["path", p, *(["ask"] if p in ASKS else []),
                 *(["typed_choice"] if p in TYPED_CHOICE else [])] for p in PATHS]),
             *(["own_type", p, t] for p, ts in OWN_TYPES.items() for t in ts),
             *(["own_mark", p, m] for p, ms in OWN_MARKS.items() for m in ms),
             *(["lane", name, lane.public, lane.served, lane.backend, lane.address,
                str(lane.idle_ms), str(int(lane.metadata)), ",".join(lane.paths)]
               for name, lane in fast.items()
               if plain(name, lane.public, lane.served, lane.backend)),
             *(["socket", record_socket(cfg, i)] for i in range(cfg.service.workers))]
    return "\n".join("\t".join(line) for line in lines)


def module_filter(cfg: Config, name: str, role: str) -> dict[str, Any]:
    """The compiled lane's module as a filter: ``lane`` (the request filters' place: the fast
    requests, whole) or ``answers`` (the response Lua's place: every other answer)."""
    return {"name": name, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                 "DynamicModuleFilter",
        "dynamic_module_config": {"name": MODULE},
        "filter_name": role,
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": module_config(cfg, lanes(cfg)[0])}}}


def filters(cfg: Config) -> list[dict[str, Any]]:
    """The two request filters (or the compiled one), before the route stage (every route but
    the reading one turns them off: ``skipped``)."""
    fast, _ = lanes(cfg)
    if not fast:
        return []
    if compiled(cfg):
        return [module_filter(cfg, LANE_FILTER, "lane")]
    # (json_to_metadata takes values, not objects: Messages' tool_choice by its type)
    rules = [_present("model"), _present("stream"), _present("tool_choice"),
             _present("choice_type", "tool_choice", "type"),
             _present("usage", "stream_options", "include_usage")]
    return [{
        "name": READ_FILTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3."
                     "JsonToMetadata",
            "request_rules": {"rules": rules}}}, {
        "name": DECIDE_FILTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": decide_lua(cfg, fast)}}}]


def unless_fast(cfg: Config, stage: dict[str, Any]) -> dict[str, Any]:
    """The route stage's filter, made only for requests the lane did not take: Envoy's
    composite filter runs it when the lane's mark is absent from the metadata when the
    request's headers reach it (after the lane has read the body). An ext_proc filter in the
    chain costs Envoy ~50,000 instructions per request even when its route turns it off
    (measured under callgrind: a third of what the compiled lane added to bare Envoy)."""
    if not lanes(cfg)[0]:
        return stage
    return {"name": stage["name"], "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        "extension_config": {"name": "composite", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"}},
        "xds_matcher": {"matcher_list": {"matchers": [{
            "predicate": {"single_predicate": {
                "input": {"name": "fast", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs."
                             "network.v3.DynamicMetadataInput",
                    "filter": META_NS, "path": [{"key": Meta.FAST.value}]}},
                "custom_match": {"name": "absent", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.input_matchers."
                             "metadata.v3.Metadata",
                    "value": {"present_match": True}, "invert": True}}}},
            "on_match": {"action": {"name": "route_stage", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3."
                         "ExecuteFilterAction",
                "typed_config": stage}}}}]}}}}


def routes(cfg: Config, default: dict[str, Any], limits: list[int]) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """The fast routes (first in the list), and the reading route (just before ``default``,
    the ordinary route it copies)."""
    if not lanes(cfg)[0]:
        return [], []
    e = cfg.envoy

    def fast(ms: int) -> dict[str, Any]:
        # One attempt (one candidate); limits as the ordinary routes set them (routes.routes).
        route: dict[str, Any] = {"cluster": (Cluster.FAST if compiled(cfg)
                                             else Cluster.DIRECT).value, "timeout": "0s"}
        if ms:
            route["retry_policy"] = {"num_retries": 0, "per_try_idle_timeout": dur(ms / 1000)}
        else:
            route["timeout"] = dur(e.route_timeout_s)
            if e.per_try_timeout_s:
                route["retry_policy"] = {"num_retries": 0,
                                         "per_try_timeout": dur(e.per_try_timeout_s)}
        return {"name": f"fast_{ms}", "match": {"prefix": "/", "dynamic_metadata": [{
            "filter": META_NS, "path": [{"key": Meta.FAST.value}],
            "value": {"string_match": {"exact": str(ms)}}}]},
            "request_headers_to_remove": removed(cfg), "route": route}

    pattern = "|".join(PATHS)
    ordinary = {k: v for k, v in default.items() if k != "typed_per_filter_config"}
    reading = {**ordinary, "name": "fast_read", "match": {
        "safe_regex": {"regex": f"^(?:{pattern})$"},
        "headers": [{"name": "content-length", "range_match": {
            "start": 1, "end": e.fast_lane_max_bytes + 1}}]}}
    return [fast(ms) for ms in [*limits, 0]], [reading]


def skipped(cfg: Config) -> dict[str, Any]:
    """The per-route config that turns the lane's two filters off (Envoy takes an enabled
    filter's off switch per route, not an on switch for a filter off by default)."""
    if not lanes(cfg)[0]:
        return {}
    names = (LANE_FILTER,) if compiled(cfg) else (READ_FILTER, DECIDE_FILTER)
    return {"typed_per_filter_config": {name: {"@type": FILTER_CONFIG, "disabled": True}
                                        for name in names}}
