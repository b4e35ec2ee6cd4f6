/* lane.c's reading of hostile input under AddressSanitizer and UndefinedBehaviorSanitizer
 * (tests/e2e/test_lane_sanitized.py builds and runs it): request bodies mutated at random
 * (bytes changed, cut short, JSON's structural pieces and escapes inserted) through the
 * decision and the rewrite, and answers through the usage, first-token and usage-chunk
 * readers. Envoy's callbacks are stubs: the body and headers are what the harness gives.
 * Then the records' batching: lines of every length sent to a socket nobody reads for a while
 * (its queue full), then read: each arrives whole, once, in order, or is counted lost. */
#include "../../src/extproc/lane/lane.c"

#include <poll.h>

size_t envoy_dynamic_module_callback_http_get_body_chunks_size(envoy_ptr a, int b) {
  (void)a; (void)b; return 0;
}
bool envoy_dynamic_module_callback_http_get_body_chunks(envoy_ptr a, int b, buf_t *c) {
  (void)a; (void)b; (void)c; return false;
}
bool envoy_dynamic_module_callback_http_drain_body(envoy_ptr a, int b, size_t c) {
  (void)a; (void)b; (void)c; return true;
}
static size_t appended;
bool envoy_dynamic_module_callback_http_append_body(envoy_ptr a, int b, buf_t c) {
  (void)a; (void)b;
  for (size_t i = 0; i < c.length; i++) appended += (unsigned char)c.ptr[i];  /* (read it all) */
  return true;
}
void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(envoy_ptr a, buf_t b,
                                                                    buf_t c, buf_t d) {
  (void)a; (void)b; (void)c; (void)d;
}
void envoy_dynamic_module_callback_http_clear_route_cache(envoy_ptr a) { (void)a; }
bool envoy_dynamic_module_callback_http_set_header(envoy_ptr a, int b, buf_t c, buf_t d) {
  (void)a; (void)b; (void)c; (void)d; return true;
}
bool envoy_dynamic_module_callback_http_filter_get_attribute_int(envoy_ptr a, int b,
                                                                 uint64_t *c) {
  (void)a; (void)b; (void)c; return false;
}
bool envoy_dynamic_module_callback_http_filter_get_attribute_string(envoy_ptr a, int b,
                                                                    buf_t *c) {
  (void)a; (void)b; (void)c; return false;
}
uint32_t envoy_dynamic_module_callback_http_filter_get_worker_index(envoy_ptr a) {
  (void)a; return 0;
}
bool envoy_dynamic_module_callback_http_get_metadata_string(envoy_ptr a, int b, buf_t c, buf_t d,
                                                            buf_t *e) {
  (void)a; (void)b; (void)c; (void)d; (void)e; return false;
}
size_t envoy_dynamic_module_callback_http_get_headers_size(envoy_ptr a, int b) {
  (void)a; (void)b; return 0;
}
bool envoy_dynamic_module_callback_http_get_headers(envoy_ptr a, int b, pair_t *c) {
  (void)a; (void)b; (void)c; return false;
}

static const char BODY[] =
  "{\"model\":\"plain\",\"stream\":true,\"tool_choice\":\"auto\",\"metadata\":{\"user_id\":\"u\"},"
  "\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hi \\u00e9\"}]},"
  "{\"role\":\"assistant\",\"content\":\"ok\",\"tool_calls\":[{\"type\":\"function\"}]}],"
  "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":"
  "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"number\"}}}}}],\"max_tokens\":-1.5e3}";
static const char ANSWER[] =
  "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"
  "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\": 6}}\r\n\r\n"
  "data: [DONE]\n\n";
static const char *const PIECES[] = {
  "{", "}", "[", "]", "\"", "\\", ":", ",", "\\u00", "\\u0061", "\\ud800", "\"model\"",
  "\"Model\"", "\"type\":\"", "\"metadata\":{\"user_id\":\"", "\"tool_choice\"", "\"usage\"",
  "\"stream_options\"", "1e999", "-", "0", "123456789012345678901", "\xff", "\xc3", "\xed\xa0\x80",
  "\xf4\x90\x80\x80", " ", "\n\n", "\r\n\r\n", "true", "nul", "\"image", "\"choices\":[]"};

static size_t mutate(char *m, size_t len, size_t cap) {
  for (int k = 1 + rand() % 6; k > 0; k--) {
    size_t at = len ? (size_t)rand() % len : 0;
    int op = rand() % 4;
    if (op == 0 && len) {
      m[at] = (char)(rand() % 256);
    } else if (op == 1) {
      len = at;
    } else {
      const char *p = PIECES[rand() % (int)(sizeof PIECES / sizeof *PIECES)];
      size_t n = strlen(p);
      if (len + n <= cap) {
        memmove(m + at + n, m + at, len - at);
        memcpy(m + at, p, n);
        len += n;
      }
    }
  }
  return len;
}

/* The config that points the lane's records at a socket (and nothing else of use). */
static config_t *records_to(const char *path) {
  char cfg[512];
  int n = snprintf(cfg, sizeof cfg, "ns\textproc\nkeys\th\tp\tr\tfast\tu\ti\to\tf\tl\n"
                   "max\t1024\nsocket\t%s", path);
  return envoy_dynamic_module_on_http_filter_config_new(NULL, (buf_t){"lane", 4},
                                                        (buf_t){cfg, (size_t)n});
}

typedef struct { long next, received, skipped, told, last_skipped; } tally_t;

/* Reads what comes until the socket is quiet for wait_ms: each L line must be whole (its length
 * as it says, the filler all 'x') and later than the last; lines skipped are tallied, as are
 * the D lines' counts of lines lost. */
static bool read_lines(int sock, tally_t *t, int wait_ms) {
  static char buf[SEND_AT + 64];
  struct pollfd p = {sock, POLLIN, 0};
  while (poll(&p, 1, wait_ms) > 0) {
    ssize_t n = recv(sock, buf, sizeof buf - 1, 0);
    if (n <= 0) return false;
    buf[n] = 0;
    for (char *line = buf, *end; *line; line = end + 1) {
      long seq, len;
      if (!(end = strchr(line, '\n'))) return false;  /* (a datagram holds whole lines) */
      if (line[0] == 'D') {
        t->told += atol(line + 2);
      } else if (sscanf(line, "L1\t%ld\t%ld\t", &seq, &len) == 2 && seq >= t->next &&
                 end - line == len && line[len - 1] == 'x') {
        if (seq > t->next) t->last_skipped = seq - 1;
        t->skipped += seq - t->next;
        t->next = seq + 1;
        t->received++;
      } else {
        fprintf(stderr, "a line out of order or cut: %.60s\n", line);
        return false;
      }
    }
  }
  return true;
}

static void record(long seq, int len) {  /* (len: at least 40) */
  static char line[4097];
  int head = snprintf(line, sizeof line, "L1\t%ld\t%d\t", seq, len);
  memset(line + head, 'x', (size_t)(len - head));
  line[len] = '\n';
  add_line(0, line, (size_t)len + 1);
}

static int check_records(void) {
  char dir[] = "/tmp/lane-records-XXXXXX", path[64];
  if (!mkdtemp(dir)) return 1;
  snprintf(path, sizeof path, "%s/s", dir);
  int sock = socket(AF_UNIX, SOCK_DGRAM, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  strcpy(a.sun_path, path);
  config_t *c = records_to(path);
  if (sock < 0 || bind(sock, (struct sockaddr *)&a, sizeof a) || !c) return 1;
  tally_t t = {0};
  long sent = 0;
  srand(11);
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < 1500; i++) record(sent++, 40 + rand() % 4000);  /* (~3 MB unread) */
    if (!read_lines(sock, &t, 200)) return 1;  /* (the flusher sends what was held) */
    if (round == 0 && t.received < 600) {  /* (the socket's queue alone holds ~260) */
      fprintf(stderr, "%ld lines came: what the full socket could not take was lost\n",
              t.received);
      return 1;
    }
  }
  /* No service there for a while (starting, restarting): held, then sent. The lines lost
   * above are told with this first datagram that goes. */
  long held = sent;
  config_free(records_to("/nonexistent/socket"));
  for (int i = 0; i < 20; i++) record(sent++, 40);
  struct timespec pause = {0, 100 * 1000000L};
  nanosleep(&pause, NULL);
  config_free(records_to(path));
  if (!read_lines(sock, &t, 200)) return 1;
  fprintf(stderr, "records %ld sent %ld read %ld lost\n", sent, t.received, t.told);
  close(sock);
  unlink(path);
  rmdir(dir);
  config_free(c);
  return t.received + t.told == sent && t.skipped == t.told && t.told > 0 &&
         t.last_skipped < held && t.next == sent ? 0 : 1;
}

int main(int argc, char **argv) {
  long iterations = argc > 1 ? atol(argv[1]) : 30000;
  static const char cfg[] =
    "ns\textproc\nkeys\thosts\tpublic_model\trequested\tfast\tusage_added\t"
    "usage_in\tusage_out\tfirst_token_us\tlast_us\nusage\t1\nhold\t1\nmax\t262144\n"
    "meta\tuser_id\nmark\t\"image\nmark\t\"input_text\nmark\t\"url\"\nmark\t\"response_format\"\n"
    "type\ttext\ntype\tfunction\ntype\tobject\ntype\tnumber\nchoice\tauto\nchoice\tnone\n"
    "path\t/v1/chat/completions\task\npath\t/v1/messages\ttyped_choice\n"
    "own_type\t/v1/messages\tthinking\n"
    "lane\tplain\tplain\tserved-name\tv\t127.0.0.1:1\t30000\t1\t/v1/chat/completions,/v1/messages";
  config_t *c = envoy_dynamic_module_on_http_filter_config_new(
      NULL, (buf_t){"lane", 4}, (buf_t){cfg, sizeof cfg - 1});
  if (!c) { fprintf(stderr, "config refused\n"); return 1; }
  filter_t f = {0};
  f.cfg = c;
  bool add = false;
  f.path = 0;
  if (!decide(&f, BODY, sizeof BODY - 1, &add) || !add) {
    fprintf(stderr, "the plain body is not fast\n");
    return 1;
  }
  srand(7);
  long fast = 0;
  static char m[8192];
  for (long i = 0; i < iterations; i++) {
    size_t len = mutate(memcpy(m, BODY, sizeof BODY - 1), sizeof BODY - 1, sizeof m);
    char *heap = malloc(len ? len : 1);  /* (exactly the body: a read past it is caught) */
    memcpy(heap, m, len);
    f.path = (int)(i % 2);
    const lane_t *l = decide(&f, heap, len, &add);
    if (l) {
      size_t n = 0;
      free(rewrite(l, add, heap, len, &n));
      fast++;
    }
    free(heap);
    len = mutate(memcpy(m, ANSWER, sizeof ANSWER - 1), sizeof ANSWER - 1, sizeof m);
    heap = malloc(len ? len : 1);
    memcpy(heap, m, len);
    filter_t a = {0};
    a.cfg = c;
    a.added = a.stream = true;
    for (size_t at = 0; at < len;) {  /* (in pieces, as a stream comes) */
      size_t n = 1 + (size_t)rand() % 64;
      if (n > len - at) n = len - at;
      without_usage(NULL, &a, heap + at, n);
      scan_usage(&a, heap + at, n);
      has_token(heap + at, n);
      at += n;
    }
    free(a.pending);
    free(heap);
  }
  fprintf(stderr, "%ld bodies, %ld fast\n", iterations, fast);
  config_free(c);
  return check_records();
}
