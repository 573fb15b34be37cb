/*
 * xs-client: a user program for /dev/azure_xs_fastpath, the posted (never merged) 2021
 * "Drivers: hv: add XStore Fastpath driver" patch that cusedev reproduces.
 *
 * It is "any program issuing the ioctl": it declares the ioctl argument and number itself, as
 * a program built against the patch's header would (../shared/spec/xs_fastpath.md §2.1-2.2),
 * and speaks fakehost's XStore request format (docs/xs-protocol.md) in the buffers the driver
 * pins. The driver reads none of those buffers; the VSP reads and writes them in place.
 *
 * Subcommands (device /dev/azure_xs_fastpath unless --dev PATH; --timeout MS, default 30000):
 *   put NAME FILE | get NAME FILE|- | ls [PREFIX] | rm NAME | stat NAME   a user tool
 *   errno --profile posted|reviewed   every errno path of spec §3.2, one line per case
 *   errno32                           the 32-bit build: every ioctl is ENOTTY (no compat_ioctl)
 *   load --threads N --ops M [--seed S]   mixed requests, every answer checked against a model
 *   big --bytes N                     put and get one N-byte blob, compare
 *   bench --threads N --seconds S     small requests per second
 *   bench-big --bytes N --rounds R    GET bandwidth against memcpy of the same size
 *   hold [--delay-aware]              one request that blocks while the host delays it
 *
 * Built by tests/build.rs as a 64-bit and a 32-bit (-m32) binary; the tests in
 * tests/tests/xs_fastpath.rs and qemu_xs_fastpath.rs run it. Exit status 0 when everything
 * asked for worked, 1 otherwise, 2 on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- the ioctl (spec §2.1-2.2) */

/* struct xs_fastpath_request_sync as the patch declares it; __aligned_u64 is spelled out so
 * the 32-bit build has the same layout (alignment 8) as the 64-bit one. */
struct xs_fastpath_request_sync {
	uint8_t guid[16];
	uint32_t timeout;
	uint32_t request_len;
	uint32_t response_len;
	uint32_t data_len;
	uint64_t request_buffer __attribute__((aligned(8)));
	uint64_t response_buffer __attribute__((aligned(8)));
	uint64_t data_buffer __attribute__((aligned(8)));
	struct {
		uint32_t status;
		uint32_t response_len;
	} response;
};

#define IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST _IOWR('R', 10, struct xs_fastpath_request_sync)

_Static_assert(sizeof(struct xs_fastpath_request_sync) == 64, "spec §2.1: 64 bytes");
_Static_assert(_Alignof(struct xs_fastpath_request_sync) == 8, "spec §2.1: alignment 8");
_Static_assert(offsetof(struct xs_fastpath_request_sync, timeout) == 16, "timeout @16");
_Static_assert(offsetof(struct xs_fastpath_request_sync, request_len) == 20, "request_len @20");
_Static_assert(offsetof(struct xs_fastpath_request_sync, response_len) == 24, "response_len @24");
_Static_assert(offsetof(struct xs_fastpath_request_sync, data_len) == 28, "data_len @28");
_Static_assert(offsetof(struct xs_fastpath_request_sync, request_buffer) == 32, "request @32");
_Static_assert(offsetof(struct xs_fastpath_request_sync, response_buffer) == 40, "response @40");
_Static_assert(offsetof(struct xs_fastpath_request_sync, data_buffer) == 48, "data @48");
_Static_assert(offsetof(struct xs_fastpath_request_sync, response.status) == 56, "status @56");
_Static_assert(offsetof(struct xs_fastpath_request_sync, response.response_len) == 60,
	       "response_len out @60");
_Static_assert((unsigned long)IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST == 0xC040520AUL,
	       "spec §2.2: _IOWR('R', 10, 64 bytes) = 0xC040520A");

/* Commands the driver does not know: the 72-byte "data_valid" header variant (spec §2.1), a
 * command without argument and one with the right number but another size and direction. */
#define CMD_DATA_VALID_VARIANT 0xC048520AUL
#define CMD_IO_R_1 ((unsigned long)_IO('R', 1))
#define CMD_IOR_R_10_INT ((unsigned long)_IOR('R', 10, int))
_Static_assert(_IOWR('R', 10, char[72]) == CMD_DATA_VALID_VARIANT, "the 72-byte variant");

/* XS_FASTPATH_MAX_PAGES, in the Hyper-V 4 KiB pages the tests' guests have. */
#define MAX_PAGES 8192u
#define PAGE 4096u
/* The largest data buffer that fits the cap with a one-page request and response. */
#define BIG_FIT ((size_t)(MAX_PAGES - 2) * PAGE)

/* ---------------------------------------------------------------- docs/xs-protocol.md */

#define XS_REQ_MAGIC 0x31525358u /* "XSR1" */
#define XS_ANS_MAGIC 0x31415358u /* "XSA1" */
#define XS_HEADER 32u
#define XS_NAME_MAX 1024u

enum xs_op { OP_GET = 1, OP_PUT = 2, OP_LIST = 3, OP_DELETE = 4, OP_STAT = 5 };

enum xs_status {
	ST_OK = 0,
	ST_BAD_REQUEST = 1,
	ST_NOT_FOUND = 2,
	ST_RANGE = 3,
	ST_TOO_SMALL = 4,
	ST_STORE_ERROR = 5,
	ST_UNSUPPORTED_VERSION = 6,
	ST_UNKNOWN_OP = 7,
	ST_TIMEOUT = 8,
};

static const char *status_name(uint32_t status)
{
	static const char *names[] = {"OK",	   "BAD_REQUEST", "NOT_FOUND",
				      "RANGE",	   "TOO_SMALL",	  "STORE_ERROR",
				      "UNSUPPORTED_VERSION", "UNKNOWN_OP", "TIMEOUT"};
	return status < sizeof(names) / sizeof(names[0]) ? names[status] : "unknown";
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
	return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Writes a request for `op` on `name` into `req` (room for 32 + 1024 bytes); returns its
 * length, the request_len to pass. */
static uint32_t encode_request(uint8_t *req, unsigned op, uint64_t offset, uint64_t length,
			       const char *name)
{
	size_t n = strlen(name);
	if (n > XS_NAME_MAX)
		n = XS_NAME_MAX;
	memset(req, 0, XS_HEADER);
	put32(req, XS_REQ_MAGIC);
	put16(req + 4, 1);
	put16(req + 6, (uint16_t)op);
	put64(req + 8, offset);
	put64(req + 16, length);
	put16(req + 24, (uint16_t)n);
	memcpy(req + XS_HEADER, name, n);
	return (uint32_t)(XS_HEADER + n);
}

/* The response buffer's fixed header. */
struct answer {
	uint32_t magic;
	uint32_t status;
	uint64_t count;
	uint64_t total;
};

static void decode_answer(const uint8_t *resp, struct answer *a)
{
	a->magic = get32(resp);
	a->status = get32(resp + 4);
	a->count = get64(resp + 8);
	a->total = get64(resp + 16);
}

/* ---------------------------------------------------------------- small helpers */

static long page_size;
static const char *device = "/dev/azure_xs_fastpath";
static uint32_t timeout_ms = 30000;
static const char *self_exe = "/proc/self/exe";

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("xs-client: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static const char *errno_name(int err)
{
	const char *name = err ? strerrorname_np(err) : "0";
	return name ? name : "E?";
}

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Page-aligned anonymous memory, read-write. */
static uint8_t *map_rw(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap %zu bytes: %s", len, strerror(errno));
	return p;
}

/* An address range of `len` bytes with nothing mapped there (reserved, then unmapped). */
static uint8_t *unmapped_range(size_t len)
{
	void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		die("reserve %zu bytes: %s", len, strerror(errno));
	munmap(p, len);
	return p;
}

static uint64_t addr(const void *p)
{
	return (uint64_t)(uintptr_t)p;
}

/* xorshift64*: per thread, so the load's choices are reproducible from --seed. */
static uint64_t rng_next(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t rng_below(uint64_t *state, uint64_t bound)
{
	return bound ? rng_next(state) % bound : 0;
}

static __thread uint64_t guid_state;

static void random_guid(uint8_t guid[16])
{
	if (!guid_state)
		guid_state = ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)&guid_state ^
			     (uint64_t)(now_seconds() * 1e9) ^ 1;
	put64(guid, rng_next(&guid_state));
	put64(guid + 8, rng_next(&guid_state));
}

static int open_device(int flags)
{
	return open(device, O_RDWR | flags);
}

static int open_or_die(void)
{
	int fd = open_device(O_CLOEXEC);
	if (fd < 0)
		die("open %s: %s", device, strerror(errno));
	return fd;
}

/* ---------------------------------------------------------------- one call */

/* The request and response buffers of one caller: one page each, page-aligned, so a call
 * costs exactly one request page and one response page against the cap. */
struct bufs {
	uint8_t *req;
	uint8_t *resp;
};

static void bufs_init(struct bufs *b)
{
	uint8_t *p = map_rw(2 * PAGE);
	b->req = p;
	b->resp = p + PAGE;
}

static void bufs_free(struct bufs *b)
{
	munmap(b->req, 2 * PAGE);
}

/* What one ioctl did: its return, errno, the two words written back, and the response
 * header (valid when ret is 0 and response_len ≥ 32). */
struct result {
	int ret;
	int err;
	uint32_t status;
	uint32_t response_len;
	struct answer a;
};

static void fill_sync(struct xs_fastpath_request_sync *s, uint32_t timeout, const void *req,
		      uint32_t req_len, void *resp, uint32_t resp_len, void *data,
		      uint32_t data_len)
{
	memset(s, 0, sizeof(*s));
	random_guid(s->guid);
	s->timeout = timeout;
	s->request_len = req_len;
	s->response_len = resp_len;
	s->data_len = data_len;
	s->request_buffer = addr(req);
	s->response_buffer = addr(resp);
	s->data_buffer = addr(data);
	/* Poison the out words: a call that returns 0 must have written both. */
	s->response.status = 0xDEADBEEF;
	s->response.response_len = 0xDEADBEEF;
}

static struct result sync_call(int fd, unsigned long cmd, void *arg)
{
	struct result r;
	memset(&r, 0, sizeof(r));
	r.ret = ioctl(fd, cmd, arg);
	r.err = r.ret < 0 ? errno : 0;
	return r;
}

/* Issues `op` on `name` with `data`/`data_len` as the data buffer and a response buffer of
 * `resp_len` bytes (≤ one page). */
static struct result xs_call(int fd, struct bufs *b, unsigned op, const char *name,
			     uint64_t offset, uint64_t length, void *data, uint32_t data_len,
			     uint32_t resp_len)
{
	struct xs_fastpath_request_sync s;
	uint32_t req_len = encode_request(b->req, op, offset, length, name);
	memset(b->resp, 0, XS_HEADER);
	fill_sync(&s, timeout_ms, b->req, req_len, b->resp, resp_len, data, data_len);
	struct result r = sync_call(fd, IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST, &s);
	r.status = s.response.status;
	r.response_len = s.response.response_len;
	if (r.ret == 0 && r.response_len >= XS_HEADER && r.response_len <= resp_len)
		decode_answer(b->resp, &r.a);
	return r;
}

/* A one-line account of a result, for messages. */
static const char *describe(const struct result *r, char *buf, size_t len)
{
	if (r->ret != 0)
		snprintf(buf, len, "ret %d errno %s", r->ret, errno_name(r->err));
	else
		snprintf(buf, len, "ret 0 status %" PRIu32 " (%s) response_len %" PRIu32
			 " count %" PRIu64 " total %" PRIu64,
			 r->status, status_name(r->status), r->response_len, r->a.count,
			 r->a.total);
	return buf;
}

/* ---------------------------------------------------------------- user tool */

static int fail_result(const char *what, const char *name, const struct result *r)
{
	char text[160];
	fprintf(stderr, "xs-client: %s %s: %s\n", what, name, describe(r, text, sizeof(text)));
	return 1;
}

static int call_ok(const struct result *r)
{
	return r->ret == 0 && r->status == ST_OK && r->a.magic == XS_ANS_MAGIC;
}

static int cmd_put(int fd, const char *name, const char *path)
{
	int in = open(path, O_RDONLY);
	if (in < 0)
		die("open %s: %s", path, strerror(errno));
	struct stat st;
	if (fstat(in, &st) != 0)
		die("stat %s: %s", path, strerror(errno));
	size_t size = (size_t)st.st_size;
	if (size > BIG_FIT)
		die("%s is %zu bytes: one PUT carries at most %zu (8192 pages less the request "
		    "and response pages)",
		    path, size, BIG_FIT);
	size_t mapped = size ? (size + PAGE - 1) / PAGE * PAGE : PAGE;
	uint8_t *data = map_rw(mapped);
	for (size_t got = 0; got < size;) {
		ssize_t n = read(in, data + got, size - got);
		if (n <= 0)
			die("read %s: %s", path, n ? strerror(errno) : "short file");
		got += (size_t)n;
	}
	close(in);
	struct bufs b;
	bufs_init(&b);
	struct result r = xs_call(fd, &b, OP_PUT, name, 0, size, data,
				  size ? (uint32_t)size : 1, XS_HEADER);
	if (!call_ok(&r) || r.a.count != size)
		return fail_result("put", name, &r);
	printf("put %s: %zu bytes stored\n", name, size);
	return 0;
}

static int cmd_stat_size(int fd, struct bufs *b, const char *name, uint64_t *size)
{
	struct result r = xs_call(fd, b, OP_STAT, name, 0, 0, NULL, 0, XS_HEADER);
	if (!call_ok(&r))
		return fail_result("stat", name, &r);
	*size = r.a.total;
	return 0;
}

static int cmd_get(int fd, const char *name, const char *path)
{
	struct bufs b;
	bufs_init(&b);
	uint64_t size;
	if (cmd_stat_size(fd, &b, name, &size))
		return 1;
	FILE *out = strcmp(path, "-") ? fopen(path, "wb") : stdout;
	if (!out)
		die("create %s: %s", path, strerror(errno));
	/* Larger blobs come in ranges of what one call can carry. */
	size_t chunk = size < BIG_FIT ? (size_t)size : BIG_FIT;
	uint8_t *data = map_rw(chunk ? chunk : PAGE);
	uint64_t offset = 0;
	do {
		struct result r = xs_call(fd, &b, OP_GET, name, offset, chunk, data,
					  chunk ? (uint32_t)chunk : 1, XS_HEADER);
		if (!call_ok(&r))
			return fail_result("get", name, &r);
		if (fwrite(data, 1, r.a.count, out) != r.a.count)
			die("write %s: %s", path, strerror(errno));
		offset += r.a.count;
		size = r.a.total;
		if (r.a.count == 0)
			break;
	} while (offset < size);
	if (out != stdout)
		fclose(out);
	else
		fflush(stdout);
	fprintf(stderr, "get %s: %" PRIu64 " bytes\n", name, offset);
	return offset == size ? 0 : 1;
}

/* LIST with paging: calls `each` for every name under `prefix`; returns the number of names
 * or -1 (with the failing result in *r). `resp_len` ≤ one page. */
static long list_names(int fd, struct bufs *b, const char *prefix, uint32_t resp_len,
		       void (*each)(void *, const char *, size_t), void *ctx, struct result *r)
{
	uint64_t index = 0, total;
	do {
		*r = xs_call(fd, b, OP_LIST, prefix, index, 0, NULL, 0, resp_len);
		if (!call_ok(r))
			return -1;
		total = r->a.total;
		size_t at = XS_HEADER;
		for (uint64_t i = 0; i < r->a.count; i++) {
			if (at + 2 > r->response_len)
				return -1;
			size_t n = get16(b->resp + at);
			if (at + 2 + n > r->response_len)
				return -1;
			each(ctx, (const char *)b->resp + at + 2, n);
			at += 2 + n;
		}
		index += r->a.count;
		if (r->a.count == 0 && index < total)
			return -1; /* no progress: the buffer cannot hold the next name */
	} while (index < total);
	return (long)index;
}

static void print_name(void *ctx, const char *name, size_t len)
{
	(void)ctx;
	printf("%.*s\n", (int)len, name);
}

static int cmd_ls(int fd, const char *prefix)
{
	struct bufs b;
	bufs_init(&b);
	struct result r;
	long n = list_names(fd, &b, prefix, PAGE, print_name, NULL, &r);
	if (n < 0)
		return fail_result("ls", prefix, &r);
	fprintf(stderr, "ls %s: %ld names\n", prefix, n);
	return 0;
}

static int cmd_rm(int fd, const char *name)
{
	struct bufs b;
	bufs_init(&b);
	struct result r = xs_call(fd, &b, OP_DELETE, name, 0, 0, NULL, 0, XS_HEADER);
	if (!call_ok(&r))
		return fail_result("rm", name, &r);
	printf("rm %s: deleted\n", name);
	return 0;
}

static int cmd_stat(int fd, const char *name)
{
	struct bufs b;
	bufs_init(&b);
	uint64_t size;
	if (cmd_stat_size(fd, &b, name, &size))
		return 1;
	printf("%s: %" PRIu64 " bytes\n", name, size);
	return 0;
}

/* ---------------------------------------------------------------- errno: the case list */

static int cases, failures;

static void report(int pass, const char *name, const char *got, const char *want)
{
	cases++;
	if (!pass)
		failures++;
	printf("%s %s: got %s want %s\n", pass ? "ok" : "FAIL", name, got, want);
	fflush(stdout);
}

/* `want` 0: the call returns 0; else it fails with errno `want`. */
static void expect_errno(const char *name, const struct result *r, int want)
{
	char got[160], wanted[64];
	if (want)
		snprintf(wanted, sizeof(wanted), "errno %s", errno_name(want));
	else
		snprintf(wanted, sizeof(wanted), "ret 0");
	int pass = want ? r->ret == -1 && r->err == want : r->ret == 0;
	report(pass, name, describe(r, got, sizeof(got)), wanted);
}

/* A call that must return 0 with these two words written back. */
static void expect_status(const char *name, const struct result *r, uint32_t status,
			  uint32_t response_len)
{
	char got[160], wanted[96];
	snprintf(wanted, sizeof(wanted), "ret 0 status %" PRIu32 " (%s) response_len %" PRIu32,
		 status, status_name(status), response_len);
	int pass = r->ret == 0 && r->status == status && r->response_len == response_len;
	report(pass, name, describe(r, got, sizeof(got)), wanted);
}

/* What every case starts from: STAT of a blob that does not exist (answered NOT_FOUND with a
 * 32-byte response), one request page, one response page, no data buffer. */
static const char *const MISSING = "errno/no-such-blob";

static void good_sync(struct xs_fastpath_request_sync *s, struct bufs *b)
{
	uint32_t req_len = encode_request(b->req, OP_STAT, 0, 0, MISSING);
	fill_sync(s, timeout_ms, b->req, req_len, b->resp, XS_HEADER, NULL, 0);
}

static struct result call_sync(int fd, struct xs_fastpath_request_sync *s)
{
	struct result r = sync_call(fd, IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST, s);
	r.status = s->response.status;
	r.response_len = s->response.response_len;
	return r;
}

/* The same request with one field changed by `tweak`. */
static struct result tweaked(int fd, struct bufs *b,
			     void (*tweak)(struct xs_fastpath_request_sync *, void *), void *ctx)
{
	struct xs_fastpath_request_sync s;
	good_sync(&s, b);
	tweak(&s, ctx);
	return call_sync(fd, &s);
}

/* A STAT request, pre-encoded, in .rodata. */
static const uint8_t RODATA_REQUEST[XS_HEADER + 2] __attribute__((aligned(64))) = {
	0x58, 0x53, 0x52, 0x31, /* "XSR1" */
	1,    0,		/* version 1 */
	OP_STAT, 0,		/* op */
	0, 0, 0, 0, 0, 0, 0, 0, /* offset */
	0, 0, 0, 0, 0, 0, 0, 0, /* length */
	2, 0,			/* name_len */
	0, 0, 0, 0, 0, 0,	/* reserved */
	'r', 'o',
};

struct field {
	int which; /* 0 request, 1 response, 2 data */
	uint64_t address;
	uint32_t len;
};

static void set_field(struct xs_fastpath_request_sync *s, void *ctx)
{
	struct field *f = ctx;
	switch (f->which) {
	case 0:
		s->request_buffer = f->address;
		break;
	case 1:
		s->response_buffer = f->address;
		break;
	default:
		s->data_buffer = f->address;
		s->data_len = f->len;
	}
}

static void set_lengths(struct xs_fastpath_request_sync *s, void *ctx)
{
	const uint32_t *lens = ctx;
	s->request_len = lens[0];
	s->response_len = lens[1];
	s->request_buffer = 0;
	s->response_buffer = 0;
}

static void set_timeout(struct xs_fastpath_request_sync *s, void *ctx)
{
	s->timeout = *(const uint32_t *)ctx;
}

/* --- credentials: the driver captured the opener's struct cred and compares pointers */

struct thread_call {
	int fd;
	struct result r;
};

static void *call_from_thread(void *arg)
{
	struct thread_call *t = arg;
	struct bufs b;
	struct xs_fastpath_request_sync s;
	bufs_init(&b);
	good_sync(&s, &b);
	t->r = call_sync(t->fd, &s);
	bufs_free(&b);
	return NULL;
}

/* One STAT on `fd`, as a result a child can send through a pipe. */
static struct result stat_on(int fd)
{
	struct bufs b;
	struct xs_fastpath_request_sync s;
	bufs_init(&b);
	good_sync(&s, &b);
	struct result r = call_sync(fd, &s);
	bufs_free(&b);
	return r;
}

static void send_results(int pipe_fd, const struct result *r, int n)
{
	if (write(pipe_fd, r, sizeof(*r) * (size_t)n) != (ssize_t)(sizeof(*r) * (size_t)n))
		_exit(99);
}

/* Runs `child` in a forked process; fills `out` with the results it sent. */
static int in_child(void (*child)(int, int), int fd, struct result *out, int n)
{
	int p[2];
	if (pipe(p) != 0)
		die("pipe: %s", strerror(errno));
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		close(p[0]);
		child(fd, p[1]);
		_exit(0);
	}
	close(p[1]);
	size_t want = sizeof(*out) * (size_t)n, got = 0;
	while (got < want) {
		ssize_t k = read(p[0], (char *)out + got, want - got);
		if (k <= 0)
			break;
		got += (size_t)k;
	}
	close(p[0]);
	int status;
	waitpid(pid, &status, 0);
	return got == want ? 0 : -1;
}

static void child_uses_inherited_fd(int fd, int out)
{
	struct result r = stat_on(fd);
	send_results(out, &r, 1);
}

/* Fresh open (works), setgroups to another list, the old fd (EACCES), a fresh open (works). */
static void child_changes_groups(int fd, int out)
{
	(void)fd;
	struct result r[3];
	memset(r, 0, sizeof(r));
	int mine = open_device(O_CLOEXEC);
	r[0] = stat_on(mine);
	gid_t other[] = {4242, 4343};
	if (setgroups(2, other) != 0) {
		r[1].ret = -1;
		r[1].err = 1000 + errno; /* setgroups itself failed: no errno can match */
	} else {
		r[1] = stat_on(mine);
	}
	int again = open_device(O_CLOEXEC);
	r[2] = stat_on(again);
	send_results(out, r, 3);
}

/* The hidden subcommand an exec'd copy runs: one STAT on the inherited fd; exit status 0 if
 * it worked, else the errno (255 when the fd was not even there). */
static int cmd_exec_child(int fd)
{
	struct result r = stat_on(fd);
	if (r.ret == 0)
		return 0;
	return r.err > 0 && r.err < 255 ? r.err : 255;
}

static struct result exec_with_inherited_fd(int fd)
{
	struct result r;
	memset(&r, 0, sizeof(r));
	char fdtext[16];
	snprintf(fdtext, sizeof(fdtext), "%d", fd);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		execl(self_exe, "xs-client", "--dev", device, "__exec-child", fdtext, (char *)NULL);
		_exit(254);
	}
	int status;
	waitpid(pid, &status, 0);
	int code = WIFEXITED(status) ? WEXITSTATUS(status) : 255;
	r.ret = code ? -1 : 0;
	r.err = code == 254 ? 0 : code;
	return r;
}

/* --- 100 concurrent opens */

struct opener {
	pthread_barrier_t *start;
	int fd;
	int err;
};

static void *open_at_once(void *arg)
{
	struct opener *o = arg;
	pthread_barrier_wait(o->start);
	o->fd = open_device(O_CLOEXEC);
	o->err = o->fd < 0 ? errno : 0;
	return NULL;
}

static void case_concurrent_opens(void)
{
	enum { N = 100 };
	struct opener o[N];
	pthread_t t[N];
	pthread_barrier_t start;
	pthread_barrier_init(&start, NULL, N);
	for (int i = 0; i < N; i++) {
		o[i].start = &start;
		if (pthread_create(&t[i], NULL, open_at_once, &o[i]) != 0)
			die("pthread_create: %s", strerror(errno));
	}
	int opened = 0, first_err = 0;
	for (int i = 0; i < N; i++) {
		pthread_join(t[i], NULL);
		if (o[i].fd >= 0)
			opened++;
		else if (!first_err)
			first_err = o[i].err;
	}
	for (int i = 0; i < N; i++)
		if (o[i].fd >= 0)
			close(o[i].fd);
	pthread_barrier_destroy(&start);
	char got[64];
	snprintf(got, sizeof(got), "%d opened (first errno %s)", opened, errno_name(first_err));
	report(opened == N, "hundred_concurrent_opens_all_succeed", got, "100 opened");
}

/* read(2) and write(2): the driver has neither method (VFS: EINVAL). */
static void case_read_write(int fd)
{
	char buf[64] = {0};
	struct result r;
	memset(&r, 0, sizeof(r));
	r.ret = (int)read(fd, buf, sizeof(buf));
	r.err = r.ret < 0 ? errno : 0;
	expect_errno("read_is_einval", &r, EINVAL);
	r.ret = (int)write(fd, buf, sizeof(buf));
	r.err = r.ret < 0 ? errno : 0;
	expect_errno("write_is_einval", &r, EINVAL);
}

/* Unknown commands, each with a valid 4 KiB argument buffer. */
static void case_unknown_commands(int fd, int unknown_errno, struct bufs *b)
{
	struct xs_fastpath_request_sync s;
	uint8_t arg72[72] __attribute__((aligned(8)));
	good_sync(&s, b);
	memcpy(arg72, &s, sizeof(s));
	memset(arg72 + 64, 0, 8);
	struct result r = sync_call(fd, CMD_DATA_VALID_VARIANT, arg72);
	expect_errno("unknown_cmd_0xC048520A_72_byte_data_valid_variant", &r, unknown_errno);
	r = sync_call(fd, CMD_IO_R_1, b->req);
	expect_errno("unknown_cmd_IO_R_1", &r, unknown_errno);
	int value = 0;
	r = sync_call(fd, CMD_IOR_R_10_INT, &value);
	expect_errno("unknown_cmd_IOR_R_10_int", &r, unknown_errno);
}

static void case_bad_argument(int fd, struct bufs *b)
{
	struct result r = sync_call(fd, IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST, NULL);
	expect_errno("arg_null_is_efault", &r, EFAULT);
	r = sync_call(fd, IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST, unmapped_range(PAGE));
	expect_errno("arg_unmapped_is_efault", &r, EFAULT);
	/* The struct's first 32 bytes at the end of a mapped page, the rest in an unmapped one. */
	uint8_t *two = map_rw(2 * PAGE);
	munmap(two + PAGE, PAGE);
	struct xs_fastpath_request_sync s;
	good_sync(&s, b);
	memcpy(two + PAGE - 32, &s, 32);
	r = sync_call(fd, IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST, two + PAGE - 32);
	expect_errno("arg_straddling_into_an_unmapped_page_is_efault", &r, EFAULT);
	munmap(two, PAGE);
}

static void case_zero_lengths(int fd, struct bufs *b)
{
	uint32_t lens[3][2] = {{0, XS_HEADER}, {XS_HEADER + 16, 0}, {0, 0}};
	const char *names[3] = {
		"request_len_0_is_einval_even_with_null_buffers",
		"response_len_0_is_einval_even_with_null_buffers",
		"both_lengths_0_are_einval_even_with_null_buffers",
	};
	for (int i = 0; i < 3; i++) {
		struct result r = tweaked(fd, b, set_lengths, lens[i]);
		expect_errno(names[i], &r, EINVAL);
	}
}

static void case_bad_buffers(int fd, struct bufs *b)
{
	static const char *null_names[3] = {"request_buffer_null_is_efault",
					    "response_buffer_null_is_efault",
					    "data_buffer_null_is_efault"};
	static const char *unmapped_names[3] = {"request_buffer_unmapped_is_efault",
						"response_buffer_unmapped_is_efault",
						"data_buffer_unmapped_is_efault"};
	uint8_t *hole = unmapped_range(4 * PAGE);
	for (int which = 0; which < 3; which++) {
		struct field f = {which, 0, PAGE};
		struct result r = tweaked(fd, b, set_field, &f);
		expect_errno(null_names[which], &r, EFAULT);
		f.address = addr(hole + PAGE);
		r = tweaked(fd, b, set_field, &f);
		expect_errno(unmapped_names[which], &r, EFAULT);
	}
	/* data_len 0: the data buffer is not looked at, whatever it says. */
	struct field garbage = {2, 0xDEAD0000BEEFULL, 0};
	struct result r = tweaked(fd, b, set_field, &garbage);
	expect_status("data_len_0_with_a_garbage_data_buffer_is_ignored", &r, ST_NOT_FOUND,
		      XS_HEADER);

	/* The patch pins every buffer with FOLL_WRITE: read-only memory fails, even the request. */
	uint8_t *ro = map_rw(PAGE);
	uint32_t req_len = encode_request(ro, OP_STAT, 0, 0, MISSING);
	mprotect(ro, PAGE, PROT_READ);
	struct xs_fastpath_request_sync s;
	good_sync(&s, b);
	s.request_buffer = addr(ro);
	s.request_len = req_len;
	r = call_sync(fd, &s);
	expect_errno("request_buffer_in_a_prot_read_mapping_is_efault", &r, EFAULT);
	good_sync(&s, b);
	s.request_buffer = addr(RODATA_REQUEST);
	s.request_len = sizeof(RODATA_REQUEST);
	r = call_sync(fd, &s);
	expect_errno("request_buffer_in_rodata_is_efault", &r, EFAULT);
	good_sync(&s, b);
	s.response_buffer = addr(ro);
	r = call_sync(fd, &s);
	expect_errno("response_buffer_in_a_prot_read_mapping_is_efault", &r, EFAULT);
	munmap(ro, PAGE);
}

/* The 8192-page cap; pages per buffer = ceil((in-page offset + length) / 4096). */
static void case_page_cap(int fd, int reviewed, struct bufs *b)
{
	size_t big = (size_t)32 << 20;
	uint8_t *data = map_rw(big);
	struct field f = {2, addr(data), (uint32_t)big};
	struct result r = tweaked(fd, b, set_field, &f);
	expect_errno("page_cap_32MiB_data_plus_request_plus_response_8194_pages_is_einval", &r,
		     EINVAL);
	f.len = (uint32_t)BIG_FIT;
	r = tweaked(fd, b, set_field, &f);
	expect_status("page_cap_exactly_8192_pages_succeeds", &r, ST_NOT_FOUND, XS_HEADER);
	f.address = addr(data + 1);
	r = tweaked(fd, b, set_field, &f);
	expect_errno("page_cap_unaligned_data_crossing_one_more_page_8193_is_einval", &r, EINVAL);
	munmap(data, big);

	/* Over the cap *and* unmapped: the order of the checks decides. posted pins first
	 * (EFAULT), reviewed checks lengths before any pinning (EINVAL). */
	int want = reviewed ? EINVAL : EFAULT;
	if (sizeof(void *) == 8) {
		uint8_t *hole = unmapped_range((size_t)4 << 30);
		struct field huge = {2, addr(hole), 0xFFFFFFFFu};
		r = tweaked(fd, b, set_field, &huge);
		expect_errno(reviewed ? "data_len_4GiB_minus_1_unmapped_is_einval_before_pinning"
				      : "data_len_4GiB_minus_1_unmapped_is_efault_pinning_first",
			     &r, want);
	}
	uint8_t *hole = unmapped_range(big);
	struct field over = {2, addr(hole), (uint32_t)big};
	r = tweaked(fd, b, set_field, &over);
	expect_errno(reviewed ? "data_32MiB_unmapped_over_the_cap_is_einval_before_pinning"
			      : "data_32MiB_unmapped_over_the_cap_is_efault_pinning_first",
		     &r, want);
}

static void case_timeouts(int fd, int reviewed, struct bufs *b)
{
	uint32_t zero = 0, one = 1, max = 60000, over = 60001;
	struct result r = tweaked(fd, b, set_timeout, &zero);
	if (reviewed)
		expect_errno("timeout_0_is_einval", &r, EINVAL);
	else
		expect_status("timeout_0_is_not_validated", &r, ST_NOT_FOUND, XS_HEADER);
	r = tweaked(fd, b, set_timeout, &over);
	if (reviewed)
		expect_errno("timeout_60001_is_einval", &r, EINVAL);
	else
		expect_status("timeout_60001_is_not_validated", &r, ST_NOT_FOUND, XS_HEADER);
	r = tweaked(fd, b, set_timeout, &one);
	expect_status("timeout_1_is_accepted", &r, ST_NOT_FOUND, XS_HEADER);
	r = tweaked(fd, b, set_timeout, &max);
	expect_status("timeout_60000_is_accepted", &r, ST_NOT_FOUND, XS_HEADER);
}

/* Bytes 0..55 of the struct at the end of a read-only page, 56..63 at the start of a
 * read-write one: only a driver that writes back just the two words can return 0. */
static void case_write_back(int fd, struct bufs *b)
{
	uint8_t *two = map_rw(2 * PAGE);
	struct xs_fastpath_request_sync s;
	good_sync(&s, b);
	uint8_t *at = two + PAGE - 56;
	memcpy(at, &s, sizeof(s));
	static const uint8_t canary[16] = {0xA5, 0x5A, 0xC3, 0x3C, 0x99, 0x66, 0x0F, 0xF0,
					   0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88};
	memcpy(at + 64, canary, sizeof(canary));
	mprotect(two, PAGE, PROT_READ);
	struct result r = sync_call(fd, IOCTL_XS_FASTPATH_DRIVER_USER_REQUEST, at);
	r.status = get32(at + 56);
	r.response_len = get32(at + 60);
	expect_status("only_offsets_56_and_60_are_written_back", &r, ST_NOT_FOUND, XS_HEADER);
	int same = memcmp(at + 64, canary, sizeof(canary)) == 0 && memcmp(at, &s, 56) == 0;
	report(same, "bytes_around_the_two_words_are_unchanged", same ? "unchanged" : "changed",
	       "unchanged");
	munmap(two, 2 * PAGE);
}

static void case_host_error(int fd, struct bufs *b)
{
	static uint8_t data[PAGE] __attribute__((aligned(PAGE)));
	struct result r = xs_call(fd, b, OP_GET, MISSING, 0, PAGE, data, PAGE, XS_HEADER);
	expect_status("get_of_a_missing_blob_is_ret_0_status_not_found", &r, ST_NOT_FOUND,
		      XS_HEADER);
	int answered = r.ret == 0 && r.a.magic == XS_ANS_MAGIC && r.a.status == ST_NOT_FOUND;
	report(answered, "response_buffer_carries_the_same_status",
	       answered ? "XSA1 NOT_FOUND" : "other", "XSA1 NOT_FOUND");
}

static void case_credentials(int fd)
{
	struct thread_call t = {fd, {0}};
	pthread_t thread;
	pthread_create(&thread, NULL, call_from_thread, &t);
	pthread_join(thread, NULL);
	expect_status("fd_used_by_another_thread_works", &t.r, ST_NOT_FOUND, XS_HEADER);

	struct result r[3];
	if (in_child(child_uses_inherited_fd, fd, r, 1) == 0)
		expect_errno("fd_used_in_a_forked_child_is_eacces", &r[0], EACCES);
	else
		report(0, "fd_used_in_a_forked_child_is_eacces", "no answer from the child",
		       "errno EACCES");

	int inherited = open_device(0); /* not O_CLOEXEC: the exec'd copy keeps it */
	r[0] = exec_with_inherited_fd(inherited);
	close(inherited);
	expect_errno("fd_inherited_across_exec_is_eacces", &r[0], EACCES);

	if (in_child(child_changes_groups, fd, r, 3) == 0) {
		expect_status("fresh_open_in_a_child_works", &r[0], ST_NOT_FOUND, XS_HEADER);
		expect_errno("fd_after_setgroups_is_eacces", &r[1], EACCES);
		expect_status("fresh_open_after_setgroups_works", &r[2], ST_NOT_FOUND, XS_HEADER);
	} else {
		report(0, "fd_after_setgroups_is_eacces", "no answer from the child", "errno EACCES");
	}
}

static int cmd_errno(const char *profile)
{
	int reviewed;
	if (!strcmp(profile, "posted"))
		reviewed = 0;
	else if (!strcmp(profile, "reviewed"))
		reviewed = 1;
	else
		die("errno: --profile posted|reviewed, not %s", profile);
	int fd = open_or_die();
	struct bufs b;
	bufs_init(&b);
	struct xs_fastpath_request_sync s;
	good_sync(&s, &b);
	struct result r = call_sync(fd, &s);
	expect_status("stat_of_a_missing_blob_is_ret_0_status_not_found", &r, ST_NOT_FOUND,
		      XS_HEADER);

	case_read_write(fd);
	case_concurrent_opens();
	case_unknown_commands(fd, reviewed ? ENOTTY : EIO, &b);
	case_bad_argument(fd, &b);
	case_zero_lengths(fd, &b);
	case_bad_buffers(fd, &b);
	case_page_cap(fd, reviewed, &b);
	case_timeouts(fd, reviewed, &b);
	case_write_back(fd, &b);
	case_host_error(fd, &b);
	case_credentials(fd);
	close(fd);
	printf("errno %s: %d cases, %d failed\n", profile, cases, failures);
	return failures ? 1 : 0;
}

/* The 32-bit build on a 64-bit kernel: the driver has no compat_ioctl, so every command,
 * the right one included, is ENOTTY (fs/ioctl.c, compat_sys_ioctl). Each with a valid
 * argument: a FUSE mount's kernel copies a restricted ioctl's argument before the server
 * sees the call, so a bad pointer would say EFAULT there, not what the driver decides. */
static int cmd_errno32(void)
{
	if (sizeof(void *) != 4)
		die("errno32 is the case list of the 32-bit build (xs-client32)");
	int fd = open_device(O_CLOEXEC);
	struct result r;
	memset(&r, 0, sizeof(r));
	r.ret = fd < 0 ? -1 : 0;
	r.err = fd < 0 ? errno : 0;
	expect_errno("open_from_a_32_bit_process_works", &r, 0);
	if (fd < 0)
		return 1;
	case_read_write(fd);
	struct bufs b;
	bufs_init(&b);
	struct xs_fastpath_request_sync s;
	good_sync(&s, &b);
	r = call_sync(fd, &s);
	expect_errno("user_request_from_32_bit_is_enotty", &r, ENOTTY);
	case_unknown_commands(fd, ENOTTY, &b);
	close(fd);
	printf("errno32: %d cases, %d failed\n", cases, failures);
	return failures ? 1 : 0;
}

/* ---------------------------------------------------------------- load: a model of every blob */

/* Blob content is a function of (generation, byte index), so any byte range of any version
 * can be checked without keeping the bytes. */
static uint64_t content_word(uint64_t gen, uint64_t word)
{
	uint64_t x = gen * 0x9E3779B97F4A7C15ULL ^ (word + 1) * 0xBF58476D1CE4E5B9ULL;
	x ^= x >> 31;
	x *= 0x94D049BB133111EBULL;
	x ^= x >> 29;
	return x;
}

static void fill_content(uint8_t *dst, uint64_t gen, uint64_t offset, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		uint64_t at = offset + i;
		dst[i] = (uint8_t)(content_word(gen, at >> 3) >> ((at & 7) * 8));
	}
}

/* Index of the first byte that differs, or -1. */
static long check_content(const uint8_t *src, uint64_t gen, uint64_t offset, size_t len)
{
	uint64_t word = 0, word_at = UINT64_MAX;
	for (size_t i = 0; i < len; i++) {
		uint64_t at = offset + i;
		if (at >> 3 != word_at) {
			word_at = at >> 3;
			word = content_word(gen, word_at);
		}
		if (src[i] != (uint8_t)(word >> ((at & 7) * 8)))
			return (long)i;
	}
	return -1;
}

#define LOAD_MAX_BLOB (256u << 10)
#define OWN_NAMES 6
#define SHARED_NAMES 4

/* A shared name: every version ever put to it (registered before the PUT is issued), so a
 * GET from another thread is checked to be one whole version, never a torn one. */
struct shared_blob {
	pthread_mutex_t lock;
	uint64_t *gens;
	uint32_t *sizes;
	size_t n, cap;
};

struct own_blob {
	int present;
	uint64_t gen;
	uint32_t size;
};

struct load {
	int threads, ops;
	uint64_t seed;
	int shared_fd;
	struct shared_blob shared[SHARED_NAMES];
	uint64_t next_gen;
	/* totals, added with atomics */
	uint64_t n_put, n_get, n_stat, n_ls, n_rm, bytes_put, bytes_got, mismatches;
};

struct worker {
	struct load *load;
	int index;
	pthread_t thread;
};

static void add(uint64_t *counter, uint64_t n)
{
	__atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

static void mismatch(struct load *l, int thread, const char *fmt, ...)
{
	uint64_t n = __atomic_fetch_add(&l->mismatches, 1, __ATOMIC_RELAXED);
	if (n >= 20)
		return;
	va_list ap;
	va_start(ap, fmt);
	char text[400];
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	fprintf(stderr, "load: MISMATCH thread %d: %s\n", thread, text);
}

static void shared_register(struct shared_blob *s, uint64_t gen, uint32_t size)
{
	pthread_mutex_lock(&s->lock);
	if (s->n == s->cap) {
		s->cap = s->cap ? s->cap * 2 : 64;
		s->gens = realloc(s->gens, s->cap * sizeof(*s->gens));
		s->sizes = realloc(s->sizes, s->cap * sizeof(*s->sizes));
		if (!s->gens || !s->sizes)
			die("out of memory");
	}
	s->gens[s->n] = gen;
	s->sizes[s->n] = size;
	s->n++;
	pthread_mutex_unlock(&s->lock);
}

/* Whether `data` (bytes offset..offset+len of a blob of `total` bytes) is part of one of the
 * versions put so far. */
static int shared_matches(struct shared_blob *s, uint64_t total, uint64_t offset,
			  const uint8_t *data, size_t len)
{
	pthread_mutex_lock(&s->lock);
	size_t n = s->n;
	pthread_mutex_unlock(&s->lock);
	for (size_t i = n; i-- > 0;) {
		pthread_mutex_lock(&s->lock);
		uint64_t gen = s->gens[i];
		uint32_t size = s->sizes[i];
		pthread_mutex_unlock(&s->lock);
		if (size == total && check_content(data, gen, offset, len) < 0)
			return 1;
	}
	return 0;
}

struct name_set {
	char names[OWN_NAMES + 1][64];
	int n;
	int overflow;
};

static void collect_name(void *ctx, const char *name, size_t len)
{
	struct name_set *set = ctx;
	if (set->n > OWN_NAMES || len >= sizeof(set->names[0])) {
		set->overflow = 1;
		return;
	}
	memcpy(set->names[set->n], name, len);
	set->names[set->n][len] = 0;
	set->n++;
}

static void *load_worker(void *arg)
{
	struct worker *w = arg;
	struct load *l = w->load;
	uint64_t rng = (l->seed + 1) * 0x9E3779B97F4A7C15ULL ^ (uint64_t)(w->index + 1) << 17;
	rng |= 1;
	/* Half the threads share one fd (opened by main), the others open their own. */
	int fd = w->index % 2 ? open_device(O_CLOEXEC) : l->shared_fd;
	if (fd < 0) {
		mismatch(l, w->index, "open: %s", strerror(errno));
		return NULL;
	}
	struct bufs b;
	bufs_init(&b);
	uint8_t *data = map_rw(LOAD_MAX_BLOB + 2 * PAGE);
	struct own_blob own[OWN_NAMES];
	memset(own, 0, sizeof(own));
	char prefix[32], name[64];
	/* Fixed width and no trailing '/': LIST takes a plain string prefix, and "load/t001" is
	 * no prefix of another thread's names. */
	snprintf(prefix, sizeof(prefix), "load/t%03d", w->index);
	char text[200];

	for (int op = 0; op < l->ops; op++) {
		uint64_t pick = rng_below(&rng, 100);
		int shared = rng_below(&rng, 4) == 0;
		int slot = (int)rng_below(&rng, shared ? SHARED_NAMES : OWN_NAMES);
		if (shared)
			snprintf(name, sizeof(name), "load/shared/s%d", slot);
		else
			snprintf(name, sizeof(name), "%s/n%d", prefix, slot);
		struct own_blob *mine = shared ? NULL : &own[slot];
		struct shared_blob *theirs = shared ? &l->shared[slot] : NULL;

		if (pick < 25) { /* PUT, most sizes small, some up to 256 KiB */
			uint32_t cap = LOAD_MAX_BLOB >> rng_below(&rng, 9);
			uint32_t size = (uint32_t)rng_below(&rng, cap + 1);
			uint64_t gen = __atomic_add_fetch(&l->next_gen, 1, __ATOMIC_RELAXED) ^
				       l->seed << 40;
			fill_content(data, gen, 0, size);
			if (theirs)
				shared_register(theirs, gen, size);
			struct result r =
				xs_call(fd, &b, OP_PUT, name, 0, size, data, size ? size : 1, XS_HEADER);
			add(&l->n_put, 1);
			if (!call_ok(&r) || r.a.count != size) {
				mismatch(l, w->index, "put %s %u bytes: %s", name, size,
					 describe(&r, text, sizeof(text)));
				continue;
			}
			add(&l->bytes_put, size);
			if (mine) {
				mine->present = 1;
				mine->gen = gen;
				mine->size = size;
			}
		} else if (pick < 60) { /* GET: whole, or a byte range, or past the end */
			uint64_t size = mine ? mine->size : LOAD_MAX_BLOB;
			uint64_t offset = 0, length;
			uint32_t data_len;
			uint64_t kind = rng_below(&rng, 4);
			if (kind == 0 || !mine) {
				length = 0xFFFFFFFFu; /* as much as the data buffer holds */
				data_len = LOAD_MAX_BLOB;
			} else {
				offset = rng_below(&rng, size ? size : 1);
				length = 1 + rng_below(&rng, size - offset + 16);
				data_len = 1 + (uint32_t)rng_below(&rng, LOAD_MAX_BLOB);
				if (kind == 3 && mine->present)
					offset = size + 1 + rng_below(&rng, 100); /* RANGE */
			}
			uint8_t *into = data + rng_below(&rng, PAGE); /* any in-page offset */
			struct result r = xs_call(fd, &b, OP_GET, name, offset, length, into,
						  data_len, XS_HEADER);
			add(&l->n_get, 1);
			if (r.ret != 0) {
				mismatch(l, w->index, "get %s: %s", name,
					 describe(&r, text, sizeof(text)));
				continue;
			}
			if (mine && !mine->present) {
				if (r.status != ST_NOT_FOUND)
					mismatch(l, w->index, "get %s (absent): %s", name,
						 describe(&r, text, sizeof(text)));
				continue;
			}
			if (theirs && r.status == ST_NOT_FOUND)
				continue; /* another thread removed it */
			if (mine && offset > size) {
				if (r.status != ST_RANGE)
					mismatch(l, w->index, "get %s offset %" PRIu64 " of %" PRIu64
						 ": %s (want RANGE)",
						 name, offset, size, describe(&r, text, sizeof(text)));
				continue;
			}
			if (!call_ok(&r)) {
				mismatch(l, w->index, "get %s: %s", name,
					 describe(&r, text, sizeof(text)));
				continue;
			}
			uint64_t total = r.a.total, count = r.a.count;
			uint64_t want = total > offset ? total - offset : 0;
			if (want > length)
				want = length;
			if (want > data_len)
				want = data_len;
			if (count != want || (mine && total != size)) {
				mismatch(l, w->index, "get %s offset %" PRIu64 " length %" PRIu64
					 " data_len %u: %s (model size %" PRIu64 ")",
					 name, offset, length, data_len,
					 describe(&r, text, sizeof(text)), size);
				continue;
			}
			add(&l->bytes_got, count);
			long bad = mine ? check_content(into, mine->gen, offset, count) : -1;
			if (mine && bad >= 0)
				mismatch(l, w->index, "get %s: byte %" PRIu64 " differs", name,
					 offset + (uint64_t)bad);
			if (theirs && !shared_matches(theirs, total, offset, into, count))
				mismatch(l, w->index,
					 "get %s: %" PRIu64 " bytes match no version ever put (torn?)",
					 name, count);
		} else if (pick < 75) { /* STAT */
			struct result r = xs_call(fd, &b, OP_STAT, name, 0, 0, NULL, 0, XS_HEADER);
			add(&l->n_stat, 1);
			int absent = r.ret == 0 && r.status == ST_NOT_FOUND;
			if (mine && !mine->present ? !absent
			    : mine ? !call_ok(&r) || r.a.total != mine->size || r.a.count != mine->size
				   : !(absent || call_ok(&r)))
				mismatch(l, w->index, "stat %s: %s (model %s %u)", name,
					 describe(&r, text, sizeof(text)),
					 mine && mine->present ? "size" : "absent",
					 mine ? mine->size : 0);
		} else if (pick < 85) { /* LIST of the own prefix, sometimes one name per call */
			struct name_set set;
			memset(&set, 0, sizeof(set));
			uint32_t resp_len = rng_below(&rng, 2) ? PAGE : 64;
			struct result r;
			long n = list_names(fd, &b, prefix, resp_len, collect_name, &set, &r);
			add(&l->n_ls, 1);
			int want = 0;
			for (int i = 0; i < OWN_NAMES; i++)
				want += own[i].present;
			int same = n == want && !set.overflow;
			for (int i = 0, j = 0; same && i < OWN_NAMES; i++) {
				if (!own[i].present)
					continue;
				/* names come in name order; n0..n5 sort as their slots */
				snprintf(name, sizeof(name), "%s/n%d", prefix, i);
				same = j < set.n && !strcmp(set.names[j], name);
				j++;
			}
			if (!same)
				mismatch(l, w->index, "ls %s: %ld names (want %d): %s", prefix, n,
					 want, describe(&r, text, sizeof(text)));
		} else { /* DELETE */
			struct result r = xs_call(fd, &b, OP_DELETE, name, 0, 0, NULL, 0, XS_HEADER);
			add(&l->n_rm, 1);
			int absent = r.ret == 0 && r.status == ST_NOT_FOUND;
			if (mine ? (mine->present ? !call_ok(&r) : !absent)
				 : !(absent || call_ok(&r)))
				mismatch(l, w->index, "rm %s: %s (model %s)", name,
					 describe(&r, text, sizeof(text)),
					 mine && mine->present ? "present" : "absent");
			if (mine)
				mine->present = 0;
		}
	}
	/* Leave nothing of this thread behind. */
	for (int i = 0; i < OWN_NAMES; i++) {
		if (!own[i].present)
			continue;
		snprintf(name, sizeof(name), "%s/n%d", prefix, i);
		struct result r = xs_call(fd, &b, OP_DELETE, name, 0, 0, NULL, 0, XS_HEADER);
		if (!call_ok(&r))
			mismatch(l, w->index, "final rm %s: %s", name,
				 describe(&r, text, sizeof(text)));
	}
	munmap(data, LOAD_MAX_BLOB + 2 * PAGE);
	bufs_free(&b);
	if (fd != l->shared_fd)
		close(fd);
	return NULL;
}

static int cmd_load(int threads, int ops, uint64_t seed)
{
	static struct load l;
	l.threads = threads;
	l.ops = ops;
	l.seed = seed;
	l.shared_fd = open_or_die();
	for (int i = 0; i < SHARED_NAMES; i++)
		pthread_mutex_init(&l.shared[i].lock, NULL);
	struct worker *w = calloc((size_t)threads, sizeof(*w));
	if (!w)
		die("out of memory");
	double start = now_seconds();
	for (int i = 0; i < threads; i++) {
		w[i].load = &l;
		w[i].index = i;
		if (pthread_create(&w[i].thread, NULL, load_worker, &w[i]) != 0)
			die("pthread_create: %s", strerror(errno));
	}
	for (int i = 0; i < threads; i++)
		pthread_join(w[i].thread, NULL);
	double secs = now_seconds() - start;
	printf("load: %d threads x %d ops in %.2f s: put %" PRIu64 " get %" PRIu64
	       " stat %" PRIu64 " ls %" PRIu64 " rm %" PRIu64 "; %" PRIu64 " bytes put, %" PRIu64
	       " bytes got; mismatches %" PRIu64 "\n",
	       threads, ops, secs, l.n_put, l.n_get, l.n_stat, l.n_ls, l.n_rm, l.bytes_put,
	       l.bytes_got, l.mismatches);
	close(l.shared_fd);
	free(w);
	return l.mismatches ? 1 : 0;
}

/* ---------------------------------------------------------------- big, bench, hold */

static int cmd_big(size_t bytes)
{
	if (bytes == 0 || bytes > BIG_FIT)
		die("big: --bytes 1..%zu (8192 pages less one request and one response page)",
		    BIG_FIT);
	int fd = open_or_die();
	char name[64];
	snprintf(name, sizeof(name), "big/%zu-bytes", bytes);
	struct bufs b;
	bufs_init(&b);
	uint8_t *out = map_rw(bytes), *in = map_rw(bytes);
	uint64_t gen = 0xB16B00B5ULL ^ bytes;
	fill_content(out, gen, 0, bytes);
	double t0 = now_seconds();
	struct result r = xs_call(fd, &b, OP_PUT, name, 0, bytes, out, (uint32_t)bytes, XS_HEADER);
	double t1 = now_seconds();
	if (!call_ok(&r) || r.a.count != bytes)
		return fail_result("big put", name, &r);
	r = xs_call(fd, &b, OP_GET, name, 0, bytes, in, (uint32_t)bytes, XS_HEADER);
	double t2 = now_seconds();
	if (!call_ok(&r) || r.a.count != bytes || r.a.total != bytes)
		return fail_result("big get", name, &r);
	long bad = check_content(in, gen, 0, bytes);
	printf("big %s: put %zu bytes in %.3f s, got %" PRIu64 " bytes in %.3f s, %s\n", name,
	       bytes, t1 - t0, r.a.count, t2 - t1, bad < 0 ? "equal" : "DIFFERENT");
	if (bad >= 0)
		fprintf(stderr, "big: first difference at byte %ld\n", bad);
	return bad < 0 ? 0 : 1;
}

struct bench {
	int fd;
	double until;
	uint64_t ops, errors;
};

static void *bench_worker(void *arg)
{
	struct bench *bn = arg;
	struct bufs b;
	bufs_init(&b);
	uint8_t *data = map_rw(PAGE);
	uint64_t ops = 0, errors = 0;
	while (now_seconds() < bn->until) {
		for (int i = 0; i < 16; i++) {
			struct result r = xs_call(bn->fd, &b, OP_GET, "bench/small", 0, 64, data,
						  PAGE, XS_HEADER);
			ops++;
			errors += !call_ok(&r) || r.a.count != 64;
		}
	}
	add(&bn->ops, ops);
	add(&bn->errors, errors);
	return NULL;
}

static int cmd_bench(int threads, double seconds)
{
	struct bench bn = {open_or_die(), 0, 0, 0};
	struct bufs b;
	bufs_init(&b);
	uint8_t *data = map_rw(PAGE);
	fill_content(data, 7, 0, 64);
	struct result r = xs_call(bn.fd, &b, OP_PUT, "bench/small", 0, 64, data, 64, XS_HEADER);
	if (!call_ok(&r))
		return fail_result("bench put", "bench/small", &r);
	pthread_t *t = calloc((size_t)threads, sizeof(*t));
	double start = now_seconds();
	bn.until = start + seconds;
	for (int i = 0; i < threads; i++)
		pthread_create(&t[i], NULL, bench_worker, &bn);
	for (int i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	double secs = now_seconds() - start;
	printf("bench: %d threads, %.2f s: %" PRIu64 " GETs of 64 bytes, %.0f ops/s, %" PRIu64
	       " errors\n",
	       threads, secs, bn.ops, (double)bn.ops / secs, bn.errors);
	free(t);
	return bn.errors ? 1 : 0;
}

static int cmd_bench_big(size_t bytes, int rounds)
{
	if (bytes == 0 || bytes > BIG_FIT)
		die("bench-big: --bytes 1..%zu", BIG_FIT);
	int fd = open_or_die();
	struct bufs b;
	bufs_init(&b);
	uint8_t *src = map_rw(bytes), *dst = map_rw(bytes);
	fill_content(src, 99, 0, bytes);
	memset(dst, 0, bytes);
	struct result r = xs_call(fd, &b, OP_PUT, "bench/big", 0, bytes, src, (uint32_t)bytes,
				  XS_HEADER);
	if (!call_ok(&r))
		return fail_result("bench-big put", "bench/big", &r);
	double t0 = now_seconds();
	for (int i = 0; i < rounds; i++) {
		r = xs_call(fd, &b, OP_GET, "bench/big", 0, bytes, dst, (uint32_t)bytes, XS_HEADER);
		if (!call_ok(&r) || r.a.count != bytes)
			return fail_result("bench-big get", "bench/big", &r);
	}
	double get_secs = now_seconds() - t0;
	t0 = now_seconds();
	for (int i = 0; i < rounds; i++) {
		memcpy(dst, src, bytes);
		__asm__ volatile("" : : "r"(dst) : "memory");
	}
	double copy_secs = now_seconds() - t0;
	double get_gbs = (double)bytes * rounds / get_secs / 1e9;
	double copy_gbs = (double)bytes * rounds / copy_secs / 1e9;
	printf("bench-big: %zu bytes x %d: GET %.3f GB/s, memcpy %.3f GB/s (floor), GET/memcpy "
	       "%.3f\n",
	       bytes, rounds, get_gbs, copy_gbs, get_gbs / copy_gbs);
	return 0;
}

/* One GET that the host is made to hold (fakehost xs --delay / --drop-responses): prints its
 * pid before the call so a test can find it in the ioctl and kill it, then how it ended.
 * --delay-aware: the request's timeout is the largest reviewed accepts (60 s), so the call
 * outlasts any delay a test sets and reviewed's own bound does not end it first. */
static int cmd_hold(int delay_aware)
{
	int fd = open_device(O_CLOEXEC);
	if (fd < 0) {
		printf("hold: open errno %s\n", errno_name(errno));
		return 1;
	}
	if (delay_aware)
		timeout_ms = 60000;
	struct bufs b;
	bufs_init(&b);
	static uint8_t data[PAGE] __attribute__((aligned(PAGE)));
	printf("hold: pid %d calling\n", (int)getpid());
	fflush(stdout);
	double t0 = now_seconds();
	struct result r = xs_call(fd, &b, OP_GET, "hold/no-such-blob", 0, PAGE, data, PAGE,
				  XS_HEADER);
	char text[160];
	printf("hold: %s after %.3f s\n", describe(&r, text, sizeof(text)), now_seconds() - t0);
	return r.ret == 0 ? 0 : 1;
}

/* ---------------------------------------------------------------- main */

static void usage(void)
{
	fputs("usage: xs-client [--dev PATH] [--timeout MS] COMMAND ...\n"
	      "  put NAME FILE | get NAME FILE|- | ls [PREFIX] | rm NAME | stat NAME\n"
	      "  errno --profile posted|reviewed | errno32\n"
	      "  load --threads N --ops M [--seed S] | big --bytes N\n"
	      "  bench --threads N --seconds S | bench-big --bytes N --rounds R\n"
	      "  hold [--delay-aware]\n",
	      stderr);
	exit(2);
}

static unsigned long long number(const char *text)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(text, &end, 0);
	if (errno || *end || end == text)
		die("not a number: %s", text);
	return v;
}

/* Value of option `name` among argv[from..argc), or `fallback`. */
static const char *option(int argc, char **argv, int from, const char *name,
			  const char *fallback)
{
	for (int i = from; i < argc; i++) {
		if (!strcmp(argv[i], name)) {
			if (i + 1 >= argc)
				usage();
			return argv[i + 1];
		}
	}
	return fallback;
}

static int has_flag(int argc, char **argv, int from, const char *name)
{
	for (int i = from; i < argc; i++)
		if (!strcmp(argv[i], name))
			return 1;
	return 0;
}

int main(int argc, char **argv)
{
	page_size = sysconf(_SC_PAGESIZE);
	if (page_size != PAGE)
		die("this client assumes 4 KiB pages (the page cap cases count them), not %ld",
		    page_size);
	int i = 1;
	for (; i < argc && argv[i][0] == '-'; i += 2) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--dev"))
			device = argv[i + 1];
		else if (!strcmp(argv[i], "--timeout"))
			timeout_ms = (uint32_t)number(argv[i + 1]);
		else
			usage();
	}
	if (i >= argc)
		usage();
	const char *cmd = argv[i++];
	int rest = argc - i;
	if (!strcmp(cmd, "put") && rest == 2)
		return cmd_put(open_or_die(), argv[i], argv[i + 1]);
	if (!strcmp(cmd, "get") && rest == 2)
		return cmd_get(open_or_die(), argv[i], argv[i + 1]);
	if (!strcmp(cmd, "ls") && rest <= 1)
		return cmd_ls(open_or_die(), rest ? argv[i] : "");
	if (!strcmp(cmd, "rm") && rest == 1)
		return cmd_rm(open_or_die(), argv[i]);
	if (!strcmp(cmd, "stat") && rest == 1)
		return cmd_stat(open_or_die(), argv[i]);
	if (!strcmp(cmd, "errno"))
		return cmd_errno(option(argc, argv, i, "--profile", "posted"));
	if (!strcmp(cmd, "errno32"))
		return cmd_errno32();
	if (!strcmp(cmd, "load"))
		return cmd_load((int)number(option(argc, argv, i, "--threads", "8")),
				(int)number(option(argc, argv, i, "--ops", "100")),
				number(option(argc, argv, i, "--seed", "1")));
	if (!strcmp(cmd, "big"))
		return cmd_big((size_t)number(option(argc, argv, i, "--bytes", "33546240")));
	if (!strcmp(cmd, "bench"))
		return cmd_bench((int)number(option(argc, argv, i, "--threads", "4")),
				 (double)number(option(argc, argv, i, "--seconds", "5")));
	if (!strcmp(cmd, "bench-big"))
		return cmd_bench_big((size_t)number(option(argc, argv, i, "--bytes", "33546240")),
				     (int)number(option(argc, argv, i, "--rounds", "10")));
	if (!strcmp(cmd, "hold"))
		return cmd_hold(has_flag(argc, argv, i, "--delay-aware"));
	if (!strcmp(cmd, "__exec-child") && rest == 1)
		return cmd_exec_child((int)number(argv[i]));
	usage();
	return 2;
}
