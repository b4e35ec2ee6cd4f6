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
  cluster with the route stage off. A request the Lua turned down stays on the reading route,
  which is the ordinary one: the route stage decides.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..contract import META_NS, Cluster, Meta
from ..core.backends import CLIENT_CREDENTIAL_HEADERS
from ..core.fast_lane import (
    FREE_CHOICES,
    NEED_KEYS,
    PATHS,
    SLOW_KEYS,
    Lane,
    lanes,
    plain_metadata,
)
from .common import EXT_PROC_PER_ROUTE_TYPE, dur

BODY_NS = "extproc.body"  # what json_to_metadata read
READ_FILTER = "extproc.fast.read"
DECIDE_FILTER = "extproc.fast.decide"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"

_LUA = """
local NS, BODY, USAGE = "@NS@", "@BODY@", @USAGE@
local LANES = {@LANES@}
local HINTS = {@HINTS@}     -- present: the route stage decides
-- Every "type" value in the body: text parts, tool calls and results, tools' JSON schemas,
-- a Messages tool_choice forcing nothing, prompt caching (any other takes the ext_proc path)
local TYPES = {text = true, ["function"] = true, tool_use = true, tool_result = true,
               object = true, string = true, number = true, integer = true, boolean = true,
               array = true, null = true, auto = true, none = true, ephemeral = true}
-- ...and per API passed natively: Responses' text parts and items (the marks of chat's that
-- are its own), Messages' extended thinking (its setting and the blocks an agent sends back)
local MESSAGES, RESPONSES = "/v1/messages", "/v1/responses"
local OWN_TYPES = {
  [RESPONSES] = {input_text = true, output_text = true, message = true, function_call = true,
                 function_call_output = true},
  [MESSAGES] = {thinking = true, redacted_thinking = true, enabled = true, disabled = true,
                adaptive = true}}
local OWN_MARKS = {[RESPONSES] = {['"input_text'] = true, ['"function_call"'] = true}}
-- The paths where a stream's usage is asked for (Messages and Responses streams carry it)
local ASKS = {["/v1/chat/completions"] = true, ["/v1/completions"] = true}
local CHOICES = {@CHOICES@}  -- tool_choice values that force nothing
local META_KEY = @META@  -- the one metadata key passed on untouched (hints are the service's)
-- Anywhere in the body (a false alarm only costs the ext_proc path): media parts' marks, and
-- the keys that need the service.
local MARKS = {'"image', '"audio', '"video', '"file', '"input_text', '"input_image',
               '"input_audio', '"input_file', '"url"', '"document', @SLOW@}

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
  local tc = path == MESSAGES and j.choice_type or j.tool_choice
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


def decide_lua(cfg: Config, fast: dict[str, Lane]) -> str:
    h = cfg.hints
    hints = [n for n in h.headers.model_dump().values() if n] if h.headers_enabled else []
    slow = [*SLOW_KEYS, *(NEED_KEYS if cfg.capability_routing.incapable == "drop" else ())]
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
                       "@CHOICES@": ", ".join(f"{c} = true" for c in FREE_CHOICES),
                       "@META@": _lua(meta_key) if meta_key else "nil",
                       "@USAGE@": "true" if cfg.envoy.token_usage else "false",
                       "@LANES@": ",\n  ".join(entries), "@HINTS@": _lua_strings(hints),
                       "@SLOW@": _lua_strings(
                           [f'"{k}"' for k in slow]), "@HOSTS@": Meta.HOSTS,
                       "@PUBLIC@": Meta.PUBLIC_MODEL, "@BACKEND@": Meta.BACKEND,
                       "@MODEL@": Meta.MODEL, "@FAST@": Meta.FAST,
                       "@ADDED@": Meta.USAGE_ADDED, "@REQUESTED@": Meta.REQUESTED}.items():
        out = out.replace(key, value)
    return out


def _present(key: str, *path: str) -> dict[str, Any]:
    return {"selectors": [{"key": k} for k in path or (key,)],
            "on_present": {"metadata_namespace": BODY_NS, "key": key,
                           "type": "PROTOBUF_VALUE"}}


def filters(cfg: Config) -> list[dict[str, Any]]:
    """The two request filters, before the route stage (every route but the reading one turns
    them off: ``skipped``)."""
    fast, _ = lanes(cfg)
    if not fast:
        return []
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


def routes(cfg: Config, default: dict[str, Any], limits: list[int]) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """The fast routes (first in the list), and the reading route (just before ``default``,
    the ordinary route it copies)."""
    if not lanes(cfg)[0]:
        return [], []
    e = cfg.envoy
    off = {"extproc.route": {"@type": EXT_PROC_PER_ROUTE_TYPE, "disabled": True}}

    def fast(ms: int) -> dict[str, Any]:
        # One attempt (one candidate); limits as the ordinary routes set them (routes.routes).
        route: dict[str, Any] = {"cluster": Cluster.DIRECT.value, "timeout": "0s"}
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
            "request_headers_to_remove": removed(cfg),
            "typed_per_filter_config": off, "route": route}

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
    return {"typed_per_filter_config": {name: {"@type": FILTER_CONFIG, "disabled": True}
                                        for name in (READ_FILTER, DECIDE_FILTER)}}
