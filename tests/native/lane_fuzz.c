/* lane.c's reading of hostile input under AddressSanitizer and UndefinedBehaviorSanitizer
 * (tests/e2e/test_lane_sanitized.py builds and runs it): request bodies mutated at random
 * (bytes changed, cut short, JSON's structural pieces and escapes inserted) through the
 * decision and the rewrite, and answers through the usage, first-token and usage-chunk
 * readers. Envoy's callbacks are stubs: the body and headers are what the harness gives. */
#include "../../src/extproc/lane/lane.c"

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

int main(int argc, char **argv) {
  long iterations = argc > 1 ? atol(argv[1]) : 30000;
  static const char cfg[] =
    "ns\textproc\nkeys\thosts\tpublic_model\trequested\tbackend\tmodel\tfast\tusage_added\t"
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
  return 0;
}
