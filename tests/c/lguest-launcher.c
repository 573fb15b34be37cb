/*
 * lguest-launcher: a Launcher for /dev/lguest in its Linux 3.x form (the LHREQ_INITIALIZE /
 * LHREQ_IRQ / LHREQ_EVENTFD interface, before v4.1 replaced it), written for cusedev's tests.
 *
 * In Linux 3.x the Guest ran inside the host kernel and the Launcher was an ordinary process:
 * it mapped the Guest's memory, told the kernel where that memory was, and then sat in read(2)
 * on /dev/lguest while the Guest ran. The read came back only when the Guest wanted something
 * from the Launcher (a NOTIFY of an address nobody else had claimed) or when the Guest died.
 * Devices were served by separate processes sharing the Launcher's memory (clone(CLONE_VM)),
 * woken by eventfds the kernel signalled on the Guest's behalf and answering with interrupts.
 *
 * Here /dev/lguest is served by cusedev (a FUSE-mounted file in the tests, a CUSE character
 * device in the QEMU guest) and the Guest is fakehost's scripted fake. This program is the
 * other party: it does what the v3.10 Launcher does with the device (../shared/spec/lguest.md
 * §4 and §7), written from those facts, plus case lists that poke each row of the §3 error
 * table. Every request is an array of `unsigned long`, so a 32-bit build (-m32) speaks in
 * 4-byte words and a 64-bit build in 8-byte ones; tests/build.rs builds both.
 *
 * Subcommands (device /dev/lguest unless --dev PATH) and the Guest script each expects
 * (fixtures/lguest/):
 *   console [--mem MIB] [--max-restarts N] [CMDLINE...]   any Guest: the console-only Launcher
 *   errno [--cuse]                       errno.guest: the §3 error table, one line per case
 *   pingpong N [--eventfd]               pingpong.guest: N notify / IRQ round trips
 *   attach-while-blocked                 attach.guest: EVENTFD from a second thread mid-read
 *   hold                                 halt.guest (or any): INITIALIZE, then read forever
 *   bench SECONDS [--eventfd]            bench-read.guest / bench-eventfd.guest
 *
 * Exit status: 0 everything worked; 1 the Guest died (console), a case failed, or a runtime
 * error; 2 usage error; 3 the Guest asked for more restarts than --max-restarts allows.
 *
 * A word on processes. The device services run as clone(CLONE_VM) children on small stacks of
 * their own, as the original Launcher's did. They share this process's memory but were never
 * set up by the C library as threads: they share the main thread's thread-local storage
 * (errno, stdio's lock owner, malloc's arena). So service code calls no libc function that
 * keeps state: it makes system calls through sys5() below, which leaves errno alone
 * (--libc-irq makes their one device call, the interrupt, through libc instead).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- the interface (spec §1) */

/* The launcher's word: every request and every notify address is one of these. */
typedef unsigned long word;
#define W ((long)sizeof(word))

/* enum lguest_req (include/linux/lguest_launcher.h, pre-4.1). */
enum {
	LHREQ_INITIALIZE = 0, /* + base, pfn_limit, start */
	LHREQ_GETDMA = 1,     /* no longer used */
	LHREQ_IRQ = 2,	      /* + irq */
	LHREQ_BREAK = 3,      /* no longer used */
	LHREQ_EVENTFD = 4,    /* + address, fd */
};

#define LGUEST_IRQS 32
#define PAGE 4096UL
#define MIB (1024UL * 1024UL)

/* Exit codes. */
enum { EXIT_OK = 0, EXIT_GUEST = 1, EXIT_USAGE = 2, EXIT_RESTARTS = 3 };

/* ERESTART (85) is what read returns when the Guest asked to be restarted. */
#ifndef ERESTART
#define ERESTART 85
#endif

/* The environment variable that counts restarts across execv. */
#define RESTARTS_ENV "LGUEST_LAUNCHER_RESTARTS"

/* ---------------------------------------------------------------- raw system calls */

/*
 * A system call with up to five arguments, returning the kernel's value (−errno on failure)
 * and touching no thread-local state: safe in a clone(CLONE_VM) service process, which shares
 * errno with the main thread. Both ABIs this file is built for pass the arguments in
 * registers.
 */
static long sys5(long nr, long a, long b, long c, long d, long e)
{
	long ret;
#if defined(__x86_64__)
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
#elif defined(__i386__)
	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e)
			 : "memory");
#else
#error "lguest-launcher knows the system call convention of x86_64 and i386 only"
#endif
	return ret;
}

static long sys_read(int fd, void *buf, size_t len)
{
	return sys5(SYS_read, fd, (long)buf, (long)len, 0, 0);
}

static long sys_write(int fd, const void *buf, size_t len)
{
	return sys5(SYS_write, fd, (long)buf, (long)len, 0, 0);
}

/* pwrite64: the offset is one register on x86_64 and a (low, high) pair on i386; a cpu
 * number always fits the low half. */
static long sys_pwrite(int fd, const void *buf, size_t len, long off)
{
	return sys5(SYS_pwrite64, fd, (long)buf, (long)len, off, 0);
}

static void sys_close(int fd)
{
	sys5(SYS_close, fd, 0, 0, 0, 0);
}

static __attribute__((noreturn)) void sys_exit(int code)
{
	for (;;)
		sys5(SYS_exit, code, 0, 0, 0, 0);
}

/* ---------------------------------------------------------------- small helpers */

static const char *device = "/dev/lguest";
/* --plain-write: send requests with write(2) at the file position, as the 3.x Launcher did,
 * instead of pwrite(2) at offset 0. On a FUSE file the kernel advances the position by what a
 * write returns (INITIALIZE returns 3·W), so later plain writes carry offset 3·W: cpu 12 or 24. */
static int plain_write;
/* --libc-irq: service processes raise interrupts through libc's pwrite/write, as v3.10's
 * Launcher did (Documentation/virtual/lguest/lguest.c, v3.10: trigger_irq calls libc's
 * write(2) from the clone'd service), instead of sys5().
 * An LD_PRELOAD library sees only calls made through libc (docs/preload.md); the default
 * raw system call would reach its descriptor, a socket, and fail with ESPIPE. */
static int libc_irq;
static char **saved_argv;
static pid_t launcher_pid;

static void stop_services(void);

static void vmsg(const char *prefix, const char *fmt, va_list ap)
{
	fflush(stdout);
	fputs(prefix, stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
}

/* Fatal to the Launcher: message, services killed (atexit), exit 1. */
static __attribute__((noreturn, format(printf, 1, 2))) void fatal(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vmsg("lguest-launcher: ", fmt, ap);
	va_end(ap);
	exit(EXIT_GUEST);
}

static __attribute__((format(printf, 1, 2))) void warn(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vmsg("lguest-launcher: warning: ", fmt, ap);
	va_end(ap);
}

static __attribute__((noreturn, format(printf, 1, 2))) void usage_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vmsg("lguest-launcher: ", fmt, ap);
	va_end(ap);
	fputs("lguest-launcher: try --help\n", stderr);
	exit(EXIT_USAGE);
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

static unsigned long parse_number(const char *text, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(text, &end, 0);
	if (errno || *end || end == text || text[0] == '-' || v > ULONG_MAX)
		usage_error("%s: not a number: %s", what, text);
	return (unsigned long)v;
}

/* What one call did: its return value and, when that is −1, errno. */
struct res {
	long ret;
	int err;
};

/* From a libc call's result: errno when it is −1. */
static struct res from_libc(long r)
{
	struct res x = {r, r < 0 ? errno : 0};
	return x;
}

/*
 * A request to the device: `len` bytes from `buf` for cpu `cpu`. The main process (and its
 * pthreads) go through libc as any program would; only the clone'd services use sys5().
 */
static struct res lg_write(int fd, const void *buf, size_t len, long cpu)
{
	if (plain_write && cpu == 0)
		return from_libc(write(fd, buf, len));
	return from_libc(pwrite(fd, buf, len, cpu));
}

/* A request of up to four words, `words` of them counted in the size. */
static struct res lg_req(int fd, long cpu, int words, word a0, word a1, word a2, word a3)
{
	word req[4] = {a0, a1, a2, a3};
	return lg_write(fd, req, (size_t)words * sizeof(word), cpu);
}

/* Running the Guest (or reading its death reason). */
static struct res lg_read(int fd, void *buf, size_t len, long cpu)
{
	return from_libc(pread(fd, buf, len, cpu));
}

static int open_device(void)
{
	return open(device, O_RDWR);
}

static int open_or_die(void)
{
	int fd = open_device();
	if (fd < 0)
		fatal("open %s: %s", device, strerror(errno));
	return fd;
}

/* ---------------------------------------------------------------- Guest memory */

/*
 * The Guest's "physical" memory is a range of this process: guest-physical address A is at
 * base + A. `mem` bytes of RAM, then `extra` pages (the device page and the vrings). Like the
 * v3.10 Launcher we reserve a guard page on either side (PROT_NONE) and make the middle
 * read-write; the pages are zero until the Guest or we write them.
 */
struct guest {
	uint8_t *base;
	unsigned long mem;
	unsigned long pfn_limit;
	unsigned long start;
};

static void guest_map(struct guest *g, unsigned long mem, unsigned long extra_pages,
		      unsigned long start)
{
	unsigned long len = mem + extra_pages * PAGE;
	if (len < mem || len + 2 * PAGE < len)
		usage_error("%lu bytes of Guest memory do not fit this address space", mem);
	uint8_t *p = mmap(NULL, len + 2 * PAGE, PROT_NONE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		fatal("mmap %lu bytes of Guest memory: %s", len, strerror(errno));
	if (mprotect(p + PAGE, len, PROT_READ | PROT_WRITE) != 0)
		fatal("mprotect Guest memory: %s", strerror(errno));
	g->base = p + PAGE;
	g->mem = mem;
	g->pfn_limit = len / PAGE;
	g->start = start;
}

/* Whether [addr, addr + len) lies inside the Guest's RAM. */
static int guest_ram_ok(const struct guest *g, uint64_t addr, uint64_t len)
{
	return addr <= g->mem && len <= g->mem - addr;
}

/* LHREQ_INITIALIZE with what guest_map chose; only a negative result is an error. */
static void lg_initialize(int fd, const struct guest *g)
{
	struct res r = lg_req(fd, 0, 4, LHREQ_INITIALIZE, (word)(uintptr_t)g->base, g->pfn_limit,
			      g->start);
	if (r.ret < 0)
		fatal("Writing to %s (LHREQ_INITIALIZE): %s", device, strerror(r.err));
}

/* The reason of a dead Guest: the read after the one that failed with ENOENT. */
static void read_reason(int fd, char *reason, size_t size)
{
	struct res r = lg_read(fd, reason, size - 1, 0);
	if (r.ret < 0)
		snprintf(reason, size, "(reading the reason failed: %s)", strerror(r.err));
	else
		reason[r.ret] = '\0';
}

/* The default memory of the subcommands other than console: 16 MiB of RAM and 7 pages above
 * it, the layout console uses, so a Guest script can touch the same addresses everywhere. */
#define TEST_MEM (16 * MIB)
#define TEST_EXTRA_PAGES 7
#define DEFAULT_START 0x100000UL

/* ---------------------------------------------------------------- service processes */

#define SERVICE_STACK (32 * 1024)
#define MAX_SERVICES 4

/*
 * One clone(CLONE_VM) child. It lives in our memory, so the parent sees its counters and its
 * error text directly. `expected` is set before we end a service on purpose, so that the
 * SIGCHLD handler can tell a planned end from a death.
 */
struct service {
	volatile pid_t pid;
	volatile int expected;
	const char *name;
	int (*fn)(void *);
	void *arg;
	uint8_t *stack;
	char error[200];
};

static struct service services[MAX_SERVICES];

/* Async-signal-safe string building for the service errors and the SIGCHLD message. */
static void str_add(char *buf, size_t cap, const char *s)
{
	size_t n = strnlen(buf, cap);
	while (*s && n + 1 < cap)
		buf[n++] = *s++;
	buf[n] = '\0';
}

static void num_add(char *buf, size_t cap, long v)
{
	char tmp[24];
	int i = (int)sizeof(tmp) - 1;
	unsigned long u = v < 0 ? 0UL - (unsigned long)v : (unsigned long)v;
	tmp[i] = '\0';
	do {
		tmp[--i] = (char)('0' + u % 10);
		u /= 10;
	} while (u && i > 1);
	if (v < 0)
		tmp[--i] = '-';
	str_add(buf, cap, tmp + i);
}

/* A service's last words: `what` and how the call ended (a negative kernel return is shown
 * as its errno name). Then the service exits 1 and the Launcher follows it. */
static __attribute__((noreturn)) void service_fail(struct service *s, const char *what, long ret)
{
	s->error[0] = '\0';
	str_add(s->error, sizeof(s->error), what);
	if (ret < 0 && ret > -4096) {
		str_add(s->error, sizeof(s->error), ": ");
		str_add(s->error, sizeof(s->error), errno_name((int)-ret));
	} else {
		str_add(s->error, sizeof(s->error), ": returned ");
		num_add(s->error, sizeof(s->error), ret);
	}
	sys_exit(1);
}

/* A service whose IRQ found the Guest dead (ENOENT, §3.1 row 3): not its fault, and the main
 * read is about to report the death with its reason. It ends quietly, so that the Launcher's
 * exit is "lguest: REASON" and not a race between that and a service error. */
static __attribute__((noreturn)) void service_guest_gone(struct service *s)
{
	s->expected = 1;
	sys_exit(0);
}

/* A service's last words about the Guest's rings: `what`, then "(NAME VALUE)". */
static __attribute__((noreturn)) void service_refuse(struct service *s, const char *what,
						      const char *name, long value)
{
	s->error[0] = '\0';
	str_add(s->error, sizeof(s->error), what);
	str_add(s->error, sizeof(s->error), " (");
	str_add(s->error, sizeof(s->error), name);
	str_add(s->error, sizeof(s->error), " ");
	num_add(s->error, sizeof(s->error), value);
	str_add(s->error, sizeof(s->error), ")");
	sys_exit(1);
}

static void write_stderr(const char *s)
{
	sys_write(2, s, strlen(s));
}

/* SIGCHLD: a service that ended without being asked to takes the Launcher with it, as in the
 * original (which killed its whole process group; we kill our services by pid, since the
 * tests run us inside their own process group). */
static void on_sigchld(int sig)
{
	(void)sig;
	int saved = errno;
	for (int i = 0; i < MAX_SERVICES; i++) {
		struct service *s = &services[i];
		pid_t pid = s->pid;
		int status;
		if (pid <= 0 || s->expected || waitpid(pid, &status, WNOHANG) != pid)
			continue;
		s->pid = 0;
		char msg[400] = "lguest-launcher: service process ";
		str_add(msg, sizeof(msg), s->name);
		str_add(msg, sizeof(msg), " (pid ");
		num_add(msg, sizeof(msg), pid);
		str_add(msg, sizeof(msg), ") died: ");
		if (s->error[0])
			str_add(msg, sizeof(msg), s->error);
		else if (WIFSIGNALED(status)) {
			str_add(msg, sizeof(msg), "killed by signal ");
			num_add(msg, sizeof(msg), WTERMSIG(status));
		} else {
			str_add(msg, sizeof(msg), "exit status ");
			num_add(msg, sizeof(msg), WEXITSTATUS(status));
		}
		str_add(msg, sizeof(msg), "\n");
		write_stderr(msg);
		for (int j = 0; j < MAX_SERVICES; j++) {
			if (services[j].pid > 0) {
				services[j].expected = 1;
				kill(services[j].pid, SIGKILL);
			}
		}
		_exit(EXIT_GUEST);
	}
	errno = saved;
}

/* The first thing a service does: die with the Launcher (a SIGKILLed Launcher runs no atexit
 * handler), and notice if the Launcher is already gone. */
static int service_trampoline(void *arg)
{
	struct service *s = arg;
	sys5(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (sys5(SYS_getppid, 0, 0, 0, 0, 0) != launcher_pid)
		sys_exit(1);
	sys_exit(s->fn(s->arg));
}

static struct service *service_start(const char *name, int (*fn)(void *), void *arg)
{
	static int handler_installed;
	if (!handler_installed) {
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_sigchld;
		sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
		sigemptyset(&sa.sa_mask);
		if (sigaction(SIGCHLD, &sa, NULL) != 0)
			fatal("sigaction SIGCHLD: %s", strerror(errno));
		atexit(stop_services);
		handler_installed = 1;
	}
	struct service *s = NULL;
	for (int i = 0; i < MAX_SERVICES && !s; i++)
		if (services[i].pid == 0 && !services[i].stack)
			s = &services[i];
	if (!s)
		fatal("more than %d service processes", MAX_SERVICES);
	s->stack = mmap(NULL, SERVICE_STACK, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (s->stack == MAP_FAILED)
		fatal("mmap a service stack: %s", strerror(errno));
	s->name = name;
	s->fn = fn;
	s->arg = arg;
	s->expected = 0;
	s->error[0] = '\0';
	fflush(stdout);
	fflush(stderr);
	/* No SIGCHLD between the clone and our noting the pid. */
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGCHLD);
	sigprocmask(SIG_BLOCK, &block, &old);
	pid_t pid = clone(service_trampoline, s->stack + SERVICE_STACK, CLONE_VM | SIGCHLD, s);
	if (pid < 0)
		fatal("clone the %s service: %s", name, strerror(errno));
	s->pid = pid;
	sigprocmask(SIG_SETMASK, &old, NULL);
	return s;
}

/* Ends one service on purpose (SIGKILL) and reaps it. */
static void service_kill(struct service *s)
{
	pid_t pid = s->pid;
	s->expected = 1;
	if (pid > 0) {
		kill(pid, SIGKILL);
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
	}
	s->pid = 0;
	if (s->stack && s->stack != MAP_FAILED)
		munmap(s->stack, SERVICE_STACK);
	s->stack = NULL;
}

/* Waits for a service that was asked to finish (expected already set); returns its status. */
static int service_join(struct service *s)
{
	int status = 0;
	pid_t pid = s->pid;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	s->pid = 0;
	munmap(s->stack, SERVICE_STACK);
	s->stack = NULL;
	return status;
}

static void stop_services(void)
{
	if (getpid() != launcher_pid)
		return;
	for (int i = 0; i < MAX_SERVICES; i++)
		services[i].expected = 1;
	for (int i = 0; i < MAX_SERVICES; i++)
		if (services[i].pid > 0 || services[i].stack)
			service_kill(&services[i]);
}

/* LHREQ_IRQ from a service: must return 0. */
static long raise_irq(int fd, word irq)
{
	word req[2] = {LHREQ_IRQ, irq};
	if (libc_irq) {
		/* errno is the main thread's too (see "A word on processes"): read at once, and
		 * only on failure, as the 3.x Launcher's err() did. */
		long r = plain_write ? write(fd, req, sizeof(req)) : pwrite(fd, req, sizeof(req), 0);
		return r < 0 ? -errno : r;
	}
	if (plain_write)
		return sys_write(fd, req, sizeof(req));
	return sys_pwrite(fd, req, sizeof(req), 0);
}

/* LHREQ_EVENTFD from the main process: must return 0. */
static void attach_eventfd(int fd, word addr, int efd)
{
	struct res r = lg_req(fd, 0, 3, LHREQ_EVENTFD, addr, (word)efd, 0);
	if (r.ret != 0) {
		if (r.ret < 0)
			fatal("Attaching eventfd for %#lx: %s", addr, strerror(r.err));
		fatal("Attaching eventfd for %#lx: returned %ld, not 0", addr, r.ret);
	}
}

/* ---------------------------------------------------------------- virtio rings */

/* The split ring (virtio 0.9.5) as the 3.x Guests lay it out: 4096-aligned. */
struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};

struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[];
};

_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc is 16 bytes");
_Static_assert(sizeof(struct vring_used_elem) == 8, "vring_used_elem is 8 bytes");

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_CONFIG_S_FAILED 0x80

#define VQ_NUM 256
/* vring_size(256, 4096): descriptors (4096) + avail (4 + 2·256 + 2, padded to 4096) + used
 * (4 + 8·256 + 2): three pages; avail at +0x1000, used at +0x2000. */
#define VRING_PAGES 3
#define VRING_AVAIL_OFF 0x1000
#define VRING_USED_OFF 0x2000

/* ---------------------------------------------------------------- console */

/* struct lguest_device_desc: type, num_vq, feature_len, config_len, status (all u8), then
 * num_vq × lguest_vqconfig {num u16, irq u16, pfn u32}, two feature bitmaps, the config. */
#define VIRTIO_ID_CONSOLE 3
#define DESC_STATUS_OFF 4
#define DESC_VQ_OFF 5
#define CONSOLE_FEATURE_LEN 4

/* Offsets in struct boot_params (Documentation/x86/zero-page.txt, boot.txt). */
#define BP_E820_ENTRIES 0x1e8
#define BP_HDR_MAGIC 0x202
#define BP_VERSION 0x206
#define BP_LOADFLAGS 0x211
#define BP_CMD_LINE_PTR 0x228
#define BP_HARDWARE_SUBARCH 0x23c
#define BP_E820_MAP 0x2d0
#define BP_SIZE 0x1000
#define E820_RAM 1
#define KEEP_SEGMENTS 0x40
#define X86_SUBARCH_LGUEST 1

struct virtqueue {
	const char *name;
	unsigned num;
	unsigned irq;
	unsigned long pfn;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t last_avail;
	int efd;
	int (*serve)(void *);
	struct service *svc;
};

struct console {
	int fd;
	struct guest g;
	uint8_t *desc; /* the device descriptor, in the device page */
	unsigned long desc_gpa;
	struct virtqueue vq[2];
	int running;
};

static struct console con;

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

/* Writes all of buf to fd from a service; partial writes are continued. */
static long write_all(int fd, const uint8_t *buf, uint32_t len)
{
	while (len) {
		long n = sys_write(fd, buf, len);
		if (n == -EINTR)
			continue;
		if (n <= 0)
			return n;
		buf += n;
		len -= (uint32_t)n;
	}
	return 0;
}

/* Writes one output chain (head `head`) to stdout; returns NULL or why it was refused. */
static const char *console_output_chain(struct virtqueue *vq, unsigned head)
{
	const struct guest *g = &con.g;
	struct vring_desc *table = vq->desc;
	unsigned max = vq->num, i = head, steps = 0;
	for (;;) {
		struct vring_desc d;
		memcpy(&d, (const void *)&table[i], sizeof(d));
		if (d.flags & VRING_DESC_F_INDIRECT) {
			if (table != vq->desc)
				return "indirect descriptor inside an indirect table";
			if (d.len == 0 || d.len % sizeof(struct vring_desc))
				return "bad indirect table length";
			if (!guest_ram_ok(g, d.addr, d.len))
				return "indirect table outside Guest RAM";
			table = (struct vring_desc *)(g->base + d.addr);
			max = d.len / (uint32_t)sizeof(struct vring_desc);
			i = 0;
			steps = 0;
			continue;
		}
		if (d.flags & VRING_DESC_F_WRITE)
			return "Input buffers in console output queue?";
		if (!guest_ram_ok(g, d.addr, d.len))
			return "output buffer outside Guest RAM";
		if (write_all(1, g->base + d.addr, d.len) < 0)
			return "write to stdout failed";
		if (!(d.flags & VRING_DESC_F_NEXT))
			return NULL;
		i = d.next;
		if (i >= max)
			return "descriptor chain runs off the table";
		if (++steps >= max)
			return "descriptor chain loops";
	}
}

/* The output vq's service: each kick, write every new buffer to stdout, return it in the used
 * ring, and interrupt the Guest unless it asked us not to. */
static int console_output_service(void *arg)
{
	struct virtqueue *vq = arg;
	struct service *s = vq->svc;
	for (;;) {
		uint64_t count;
		long n = sys_read(vq->efd, &count, sizeof(count));
		if (n == -EINTR)
			continue;
		if (n != (long)sizeof(count))
			service_fail(s, "reading the output eventfd", n);
		int used = 0;
		for (;;) {
			uint16_t avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
			if (avail_idx == vq->last_avail)
				break;
			if ((uint16_t)(avail_idx - vq->last_avail) > vq->num)
				service_refuse(s, "Guest moved the avail index by more than the ring",
					       "avail.idx", avail_idx);
			unsigned head = vq->avail->ring[vq->last_avail % vq->num];
			if (head >= vq->num)
				service_refuse(s, "Guest says an index past the ring is available",
					       "head", (long)head);
			const char *why = console_output_chain(vq, head);
			if (why)
				service_refuse(s, why, "head", (long)head);
			uint16_t used_idx = vq->used->idx;
			vq->used->ring[used_idx % vq->num].id = head;
			vq->used->ring[used_idx % vq->num].len = 0; /* we wrote nothing into it */
			__atomic_store_n(&vq->used->idx, (uint16_t)(used_idx + 1), __ATOMIC_RELEASE);
			vq->last_avail++;
			used++;
		}
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (used && !(__atomic_load_n(&vq->avail->flags, __ATOMIC_ACQUIRE) &
			      VRING_AVAIL_F_NO_INTERRUPT)) {
			long r = raise_irq(con.fd, vq->irq);
			if (r == -ENOENT)
				service_guest_gone(s);
			if (r != 0)
				service_fail(s, "Triggering irq", r);
		}
	}
}

/* The input vq's service: we have nothing to type, so it only swallows the kicks. */
static int console_input_service(void *arg)
{
	struct virtqueue *vq = arg;
	for (;;) {
		uint64_t count;
		long n = sys_read(vq->efd, &count, sizeof(count));
		if (n != (long)sizeof(count) && n != -EINTR)
			service_fail(vq->svc, "reading the input eventfd", n);
	}
}

/* Lays out RAM and the device page: boot_params at 0 with one e820 RAM entry [0, mem), the
 * command line after it, the console descriptor at gpa mem, the vrings on the pages after. */
static void console_setup(unsigned long mem, const char *cmdline)
{
	struct guest *g = &con.g;
	guest_map(g, mem, 1 + 2 * VRING_PAGES, DEFAULT_START);
	uint8_t *bp = g->base;
	bp[BP_E820_ENTRIES] = 1;
	put64(bp + BP_E820_MAP, 0);
	put64(bp + BP_E820_MAP + 8, mem);
	put32(bp + BP_E820_MAP + 16, E820_RAM);
	put32(bp + BP_HDR_MAGIC, 0x53726448); /* "HdrS" */
	put16(bp + BP_VERSION, 0x207);
	bp[BP_LOADFLAGS] = KEEP_SEGMENTS;
	put32(bp + BP_HARDWARE_SUBARCH, X86_SUBARCH_LGUEST);
	size_t len = strlen(cmdline);
	if (len + 1 > mem - BP_SIZE || len > 4095)
		usage_error("the command line is too long");
	memcpy(bp + BP_SIZE, cmdline, len + 1);
	put32(bp + BP_CMD_LINE_PTR, BP_SIZE);

	con.desc_gpa = mem;
	con.desc = g->base + mem;
	uint8_t *d = con.desc;
	d[0] = VIRTIO_ID_CONSOLE;
	d[1] = 2;
	d[2] = CONSOLE_FEATURE_LEN;
	d[3] = 0;
	d[4] = 0;
	static const char *const names[2] = {"console-input", "console-output"};
	int (*const serve[2])(void *) = {console_input_service, console_output_service};
	for (int i = 0; i < 2; i++) {
		struct virtqueue *vq = &con.vq[i];
		vq->name = names[i];
		vq->num = VQ_NUM;
		vq->irq = (unsigned)i + 1;
		vq->pfn = mem / PAGE + 1 + (unsigned long)i * VRING_PAGES;
		uint8_t *ring = g->base + vq->pfn * PAGE;
		vq->desc = (struct vring_desc *)ring;
		vq->avail = (struct vring_avail *)(ring + VRING_AVAIL_OFF);
		vq->used = (struct vring_used *)(ring + VRING_USED_OFF);
		vq->serve = serve[i];
		uint8_t *cfg = d + DESC_VQ_OFF + 8 * i;
		put16(cfg, (uint16_t)vq->num);
		put16(cfg + 2, (uint16_t)vq->irq);
		put32(cfg + 4, (uint32_t)vq->pfn);
	}
	/* Host features after the vqconfigs; the Guest's accepted bitmap follows them. */
	uint8_t *features = d + DESC_VQ_OFF + 16;
	features[VIRTIO_RING_F_INDIRECT_DESC / 8] |= 1u << (VIRTIO_RING_F_INDIRECT_DESC % 8);
	/* The next descriptor's type byte, 0, ends the list (the page is zero already). */
}

static void console_start(void)
{
	for (int i = 0; i < 2; i++) {
		struct virtqueue *vq = &con.vq[i];
		int efd = eventfd(0, 0);
		if (efd < 0)
			fatal("eventfd: %s", strerror(errno));
		attach_eventfd(con.fd, vq->pfn * PAGE, efd);
		vq->efd = efd;
		vq->last_avail = 0;
		vq->svc = service_start(vq->name, vq->serve, vq);
		/* The service has its own copy of efd; the kernel holds its own reference. Closing
		 * ours means the second EVENTFD carries the same fd number as the first. */
		close(efd);
	}
	con.running = 1;
}

/* A reset: stop the services, forget the rings and what the Guest accepted. */
static void console_reset(void)
{
	for (int i = 0; i < 2; i++) {
		struct virtqueue *vq = &con.vq[i];
		if (vq->svc)
			service_kill(vq->svc);
		vq->svc = NULL;
		vq->last_avail = 0;
		memset(con.g.base + vq->pfn * PAGE, 0, VRING_PAGES * PAGE);
	}
	memset(con.desc + DESC_VQ_OFF + 16 + CONSOLE_FEATURE_LEN, 0, CONSOLE_FEATURE_LEN);
	con.running = 0;
}

/* The Guest wrote the descriptor's status byte and NOTIFYed the descriptor's address. */
static void console_status(void)
{
	uint8_t status = __atomic_load_n(&con.desc[DESC_STATUS_OFF], __ATOMIC_ACQUIRE);
	if (status == 0) {
		if (con.running)
			console_reset();
	} else if (status & VIRTIO_CONFIG_S_FAILED) {
		warn("Device console configuration FAILED (status %#x)", status);
		if (con.running)
			console_reset();
	} else {
		if (con.running)
			fatal("Device console features finalized twice");
		console_start();
	}
}

/* A NOTIFY that reached our read: the device's status, a vq kick no eventfd took (fatal: the
 * vq was never set up), or a string to print (the early console). */
static void console_notify(word addr)
{
	if (addr == con.desc_gpa) {
		console_status();
		return;
	}
	for (int i = 0; i < 2; i++)
		if (addr == con.vq[i].pfn * PAGE)
			fatal("Notification on console before setup!");
	if (addr >= con.g.mem)
		fatal("Bad NOTIFY %#lx", addr);
	const char *s = (const char *)con.g.base + addr;
	size_t n = strnlen(s, con.g.mem - addr);
	fwrite(s, 1, n, stdout);
	fflush(stdout);
}

static unsigned restarts_so_far(void)
{
	const char *v = getenv(RESTARTS_ENV);
	return v ? (unsigned)strtoul(v, NULL, 10) : 0;
}

/* ERESTART: the Guest wants a fresh start. Like the original: close everything past stderr
 * and exec ourselves (the same argv), which opens and INITIALIZEs anew. */
static __attribute__((noreturn)) void console_restart(unsigned max_restarts)
{
	unsigned done = restarts_so_far();
	if (done >= max_restarts) {
		fprintf(stderr,
			"lguest-launcher: the Guest asked for restart %u, more than --max-restarts "
			"%u allows; giving up\n",
			done + 1, max_restarts);
		stop_services();
		exit(EXIT_RESTARTS);
	}
	fprintf(stderr, "lguest-launcher: restart %u of at most %u\n", done + 1, max_restarts);
	stop_services();
	char text[16];
	snprintf(text, sizeof(text), "%u", done + 1);
	setenv(RESTARTS_ENV, text, 1);
	fflush(stdout);
	fflush(stderr);
	if (close_range(3, ~0U, 0) != 0)
		for (int fd = 3; fd < 1024; fd++)
			close(fd);
	execv("/proc/self/exe", saved_argv);
	fatal("execv /proc/self/exe: %s", strerror(errno));
}

static int cmd_console(unsigned long mem_mib, unsigned max_restarts, const char *cmdline)
{
	if (mem_mib == 0)
		usage_error("console: --mem must be at least 1 (MiB)");
	if (mem_mib > (ULONG_MAX - 16 * PAGE) / MIB)
		usage_error("console: --mem %lu MiB does not fit this address space", mem_mib);
	console_setup(mem_mib * MIB, cmdline);
	con.fd = open_or_die();
	lg_initialize(con.fd, &con.g);
	for (;;) {
		word addr = 0;
		struct res r = lg_read(con.fd, &addr, sizeof(addr), 0);
		if (r.ret == W) {
			console_notify(addr);
			continue;
		}
		if (r.ret >= 0)
			fatal("Running guest failed: read returned %ld, not %ld", r.ret, W);
		if (r.err == EINTR)
			continue; /* what SA_RESTART would have done */
		if (r.err == ENOENT) {
			char reason[1024];
			read_reason(con.fd, reason, sizeof(reason));
			fflush(stdout);
			fprintf(stderr, "lguest: %s\n", reason);
			return EXIT_GUEST;
		}
		if (r.err == ERESTART)
			console_restart(max_restarts);
		fatal("Running guest failed: %s", strerror(r.err));
	}
}

/* ---------------------------------------------------------------- errno: the case list */

static int cases, failures;

/* The same line format as tests/c/xs-client.c, so one Rust helper checks both. */
static void report(int pass, const char *name, const char *got, const char *want)
{
	cases++;
	if (!pass)
		failures++;
	printf("%s %s: got %s want %s\n", pass ? "ok" : "FAIL", name, got, want);
	fflush(stdout);
}

static void skip(const char *name, const char *why)
{
	printf("skip %s: %s\n", name, why);
	fflush(stdout);
}

static const char *describe(struct res r, char *buf, size_t len)
{
	if (r.ret < 0)
		snprintf(buf, len, "ret -1 errno %s", errno_name(r.err));
	else
		snprintf(buf, len, "ret %ld", r.ret);
	return buf;
}

/* want_err 0: the call returns want_ret; else it fails with errno want_err. */
static void expect(const char *name, struct res r, long want_ret, int want_err)
{
	char got[96], want[64];
	if (want_err)
		snprintf(want, sizeof(want), "ret -1 errno %s", errno_name(want_err));
	else
		snprintf(want, sizeof(want), "ret %ld", want_ret);
	int pass = want_err ? r.ret == -1 && r.err == want_err : r.ret == want_ret;
	report(pass, name, describe(r, got, sizeof(got)), want);
}

/* `n` bytes as a C string literal (\0 and non-printables escaped). */
static const char *quote(const char *s, long n, char *buf, size_t len)
{
	size_t at = 0;
	buf[at++] = '"';
	for (long i = 0; i < n && at + 6 < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\')
			buf[at++] = (char)c;
		else
			at += (size_t)snprintf(buf + at, len - at, c ? "\\x%02x" : "\\0", c);
	}
	buf[at++] = '"';
	buf[at] = '\0';
	return buf;
}

/* A read that must return exactly `want_len` bytes equal to `want` (and leave the byte after
 * them untouched). */
static void expect_bytes(const char *name, struct res r, const char *buf, const char *want,
			 long want_len)
{
	char got[200], wanted[200], q[160];
	snprintf(wanted, sizeof(wanted), "ret %ld %s", want_len, quote(want, want_len, q, sizeof(q)));
	if (r.ret < 0) {
		describe(r, got, sizeof(got));
		report(0, name, got, wanted);
		return;
	}
	snprintf(got, sizeof(got), "ret %ld %s", r.ret, quote(buf, r.ret, q, sizeof(q)));
	int pass = r.ret == want_len && !memcmp(buf, want, (size_t)want_len) &&
		   (unsigned char)buf[want_len] == 0xAA;
	report(pass, name, got, wanted);
}

/* An address range with nothing mapped there (reserved, then unmapped). */
static uint8_t *unmapped_range(size_t len)
{
	void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		fatal("reserve %zu bytes: %s", len, strerror(errno));
	munmap(p, len);
	return p;
}

/* A word whose successors are unmapped: the last word of a page followed by a hole. Writing
 * `req` there makes every argument word fault while the request word itself reads fine. */
static word *edge_word(word req)
{
	uint8_t *p = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			  -1, 0);
	if (p == MAP_FAILED)
		fatal("mmap: %s", strerror(errno));
	munmap(p + PAGE, PAGE);
	word *w = (word *)(p + PAGE - sizeof(word));
	*w = req;
	return w;
}

/* An fd number with nothing open there. */
static int closed_fd_number(void)
{
	int n = 1000;
	while (fcntl(n, F_GETFD) != -1)
		n++;
	return n;
}

struct thread_read {
	int fd;
	struct res r;
};

static void *read_in_thread(void *arg)
{
	struct thread_read *t = arg;
	word addr;
	t->r = lg_read(t->fd, &addr, sizeof(addr), 0);
	return NULL;
}

/* A read from another thread of this process (not the task that INITIALIZEd). */
static struct res read_from_thread(int fd)
{
	struct thread_read t = {fd, {0, 0}};
	pthread_t th;
	int e = pthread_create(&th, NULL, read_in_thread, &t);
	if (e)
		fatal("pthread_create: %s", strerror(e));
	pthread_join(th, NULL);
	return t.r;
}

/* A read from a forked child on the inherited fd. */
static struct res read_from_child(int fd)
{
	int p[2];
	if (pipe(p) != 0)
		fatal("pipe: %s", strerror(errno));
	fflush(stdout);
	fflush(stderr);
	pid_t pid = fork();
	if (pid < 0)
		fatal("fork: %s", strerror(errno));
	if (pid == 0) {
		word addr;
		struct res r = lg_read(fd, &addr, sizeof(addr), 0);
		_exit(write(p[1], &r, sizeof(r)) == (ssize_t)sizeof(r) ? 0 : 1);
	}
	close(p[1]);
	struct res r = {-2, 0};
	if (read(p[0], &r, sizeof(r)) != (ssize_t)sizeof(r))
		r.ret = -2;
	close(p[0]);
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
	return r;
}

static const char CRASH_REASON[] = "CRASH: errno list";

/* Every row of spec §3.1 and §3.2 that a Launcher can reach, in an order that keeps each
 * state (not initialised, initialised, dead) long enough to test it. --cuse: CUSE passes
 * offset 0 for every read and write (fs/fuse/cuse.c), so the cpu-1 cases cannot be told
 * apart there; they are skipped. */
static int cmd_errno(int cuse)
{
	char got[200];
	printf("errno: word %ld bytes, device %s\n", W, device);
	fflush(stdout);
	int fd = open_or_die();
	int efd = eventfd(0, 0);
	if (efd < 0)
		fatal("eventfd: %s", strerror(errno));
	word addr;
	struct guest g;
	guest_map(&g, TEST_MEM, TEST_EXTRA_PAGES, DEFAULT_START);

	/* Not initialised: every request but INITIALIZE is EINVAL (row 2), and so is read. */
	expect("write-irq-before-init-einval", lg_req(fd, 0, 2, LHREQ_IRQ, 0, 0, 0), 0, EINVAL);
	expect("write-eventfd-before-init-einval",
	       lg_req(fd, 0, 3, LHREQ_EVENTFD, 0x1000, (word)efd, 0), 0, EINVAL);
	expect("write-getdma-before-init-einval", lg_req(fd, 0, 2, LHREQ_GETDMA, 0, 0, 0), 0,
	       EINVAL);
	expect("write-break-before-init-einval", lg_req(fd, 0, 2, LHREQ_BREAK, 0, 0, 0), 0,
	       EINVAL);
	expect("write-req5-before-init-einval", lg_req(fd, 0, 2, 5, 0, 0, 0), 0, EINVAL);
	expect("write-req-0xffff-before-init-einval", lg_req(fd, 0, 2, 0xffff, 0, 0, 0), 0,
	       EINVAL);
	expect("read-before-init-einval", lg_read(fd, &addr, sizeof(addr), 0), 0, EINVAL);

	/* Faults: the request word (row 1) and INITIALIZE's arguments (row 5). Neither
	 * initialises, so the real INITIALIZE below still succeeds. */
	expect("write-unmapped-buffer-efault", lg_write(fd, unmapped_range(PAGE), 4 * sizeof(word), 0),
	       0, EFAULT);
	expect("initialize-args-unmapped-efault",
	       lg_write(fd, edge_word(LHREQ_INITIALIZE), 4 * sizeof(word), 0), 0, EFAULT);

	/* INITIALIZE returns 3·W, the size of its argument block (row 7); a second one is EBUSY. */
	expect("initialize-returns-3w",
	       lg_req(fd, 0, 4, LHREQ_INITIALIZE, (word)(uintptr_t)g.base, g.pfn_limit, g.start),
	       3 * W, 0);
	expect("initialize-twice-ebusy",
	       lg_req(fd, 0, 4, LHREQ_INITIALIZE, (word)(uintptr_t)g.base, g.pfn_limit, g.start), 0,
	       EBUSY);

	/* The file offset is the cpu; only cpu 0 exists. */
	if (cuse) {
		skip("write-irq-cpu1-einval", "CUSE passes offset 0");
		skip("read-cpu1-einval", "CUSE passes offset 0");
	} else {
		expect("write-irq-cpu1-einval", lg_req(fd, 1, 2, LHREQ_IRQ, 0, 0, 0), 0, EINVAL);
		expect("read-cpu1-einval", lg_read(fd, &addr, sizeof(addr), 1), 0, EINVAL);
	}

	/* IRQ: 0..31 (rows 8-10). */
	expect("write-irq-31-ok", lg_req(fd, 0, 2, LHREQ_IRQ, 31, 0, 0), 0, 0);
	expect("write-irq-32-einval", lg_req(fd, 0, 2, LHREQ_IRQ, 32, 0, 0), 0, EINVAL);
	expect("write-irq-minus-1-einval", lg_req(fd, 0, 2, LHREQ_IRQ, (word)-1, 0, 0), 0, EINVAL);
	expect("write-irq-arg-unmapped-efault", lg_write(fd, edge_word(LHREQ_IRQ), 2 * sizeof(word), 0),
	       0, EFAULT);
	/* The size is ignored: a write of one word still has its irq read from the next. */
	expect("write-irq-size-one-word-reads-next-word-ok", lg_req(fd, 0, 1, LHREQ_IRQ, 7, 0, 0),
	       0, 0);
	expect("write-irq-size-one-word-next-word-32-einval",
	       lg_req(fd, 0, 1, LHREQ_IRQ, 32, 0, 0), 0, EINVAL);

	/* EVENTFD (rows 11-15). */
	int pipe_fds[2];
	if (pipe(pipe_fds) != 0)
		fatal("pipe: %s", strerror(errno));
	expect("write-eventfd-addr-0-einval", lg_req(fd, 0, 3, LHREQ_EVENTFD, 0, (word)efd, 0), 0,
	       EINVAL);
	expect("write-eventfd-fd-not-open-ebadf",
	       lg_req(fd, 0, 3, LHREQ_EVENTFD, 0x3000, (word)closed_fd_number(), 0), 0, EBADF);
	expect("write-eventfd-pipe-einval",
	       lg_req(fd, 0, 3, LHREQ_EVENTFD, 0x3000, (word)pipe_fds[0], 0), 0, EINVAL);
	expect("write-eventfd-device-fd-einval",
	       lg_req(fd, 0, 3, LHREQ_EVENTFD, 0x3000, (word)fd, 0), 0, EINVAL);
	expect("write-eventfd-args-unmapped-efault",
	       lg_write(fd, edge_word(LHREQ_EVENTFD), 3 * sizeof(word), 0), 0, EFAULT);
	expect("write-eventfd-ok", lg_req(fd, 0, 3, LHREQ_EVENTFD, 0x3000, (word)efd, 0), 0, 0);
	expect("write-eventfd-same-address-again-ok",
	       lg_req(fd, 0, 3, LHREQ_EVENTFD, 0x3000, (word)efd, 0), 0, 0);
	close(pipe_fds[0]);
	close(pipe_fds[1]);

	/* Requests nobody serves any more (row 16). */
	expect("write-getdma-after-init-einval", lg_req(fd, 0, 2, LHREQ_GETDMA, 0, 0, 0), 0, EINVAL);
	expect("write-break-after-init-einval", lg_req(fd, 0, 2, LHREQ_BREAK, 0, 0, 0), 0, EINVAL);
	expect("write-req5-after-init-einval", lg_req(fd, 0, 2, 5, 0, 0, 0), 0, EINVAL);

	/* Only the task that INITIALIZEd may run the Guest (§3.2 row 3). */
	expect("read-from-other-thread-eperm", read_from_thread(fd), 0, EPERM);
	expect("read-from-forked-child-eperm", read_from_child(fd), 0, EPERM);

	/* Now run it: errno.guest dies at once. First ENOENT, then the reason on every read. */
	struct res r = lg_read(fd, &addr, sizeof(addr), 0);
	if (r.ret == W) {
		snprintf(got, sizeof(got), "ret %ld (NOTIFY %#lx)", r.ret, addr);
		report(0, "read-runs-guest-until-death-enoent", got, "ret -1 errno ENOENT");
	} else {
		expect("read-runs-guest-until-death-enoent", r, 0, ENOENT);
	}
	char buf[1024];
	long want_len = (long)sizeof(CRASH_REASON); /* with the NUL */
	memset(buf, 0xAA, sizeof(buf));
	r = lg_read(fd, buf, 1023, 0);
	expect_bytes("read-reason-with-nul", r, buf, CRASH_REASON, want_len);
	memset(buf, 0xAA, sizeof(buf));
	r = lg_read(fd, buf, 4, 0);
	expect_bytes("read-reason-4-bytes-truncated-no-nul", r, buf, CRASH_REASON, 4);
	expect("read-reason-0-bytes-returns-0", lg_read(fd, buf, 0, 0), 0, 0);
	memset(buf, 0xAA, sizeof(buf));
	r = lg_read(fd, buf, 1023, 0);
	expect_bytes("read-reason-again-same", r, buf, CRASH_REASON, want_len);
	expect("read-from-other-thread-after-death-eperm", read_from_thread(fd), 0, EPERM);

	/* Dead: every request but INITIALIZE is ENOENT (row 3), after the cpu check (row 2);
	 * INITIALIZE is still EBUSY (row 4). */
	expect("write-irq-after-death-enoent", lg_req(fd, 0, 2, LHREQ_IRQ, 1, 0, 0), 0, ENOENT);
	expect("write-eventfd-after-death-enoent",
	       lg_req(fd, 0, 3, LHREQ_EVENTFD, 0x1000, (word)efd, 0), 0, ENOENT);
	expect("write-break-after-death-enoent", lg_req(fd, 0, 2, LHREQ_BREAK, 0, 0, 0), 0, ENOENT);
	expect("write-req5-after-death-enoent", lg_req(fd, 0, 2, 5, 0, 0, 0), 0, ENOENT);
	if (cuse)
		skip("write-irq-cpu1-after-death-einval", "CUSE passes offset 0");
	else
		expect("write-irq-cpu1-after-death-einval", lg_req(fd, 1, 2, LHREQ_IRQ, 1, 0, 0), 0,
		       EINVAL);
	expect("initialize-after-death-ebusy",
	       lg_req(fd, 0, 4, LHREQ_INITIALIZE, (word)(uintptr_t)g.base, g.pfn_limit, g.start), 0,
	       EBUSY);

	/* Each open is its own Guest. */
	int fd2 = open_device();
	if (fd2 < 0) {
		r.ret = -1;
		r.err = errno;
		expect("second-open-ok", r, 0, 0);
	} else {
		report(1, "second-open-ok", "an fd", "an fd");
		expect("second-open-read-before-init-einval", lg_read(fd2, &addr, sizeof(addr), 0), 0,
		       EINVAL);
		expect("second-open-initialize-returns-3w",
		       lg_req(fd2, 0, 4, LHREQ_INITIALIZE, (word)(uintptr_t)g.base, g.pfn_limit,
			      g.start),
		       3 * W, 0);
		expect("second-open-close-returns-0", from_libc(close(fd2)), 0, 0);
	}
	close(efd);
	expect("close-returns-0", from_libc(close(fd)), 0, 0);
	printf("errno: %d cases, %d failed\n", cases, failures);
	return failures ? EXIT_GUEST : EXIT_OK;
}

/* ---------------------------------------------------------------- pingpong */

struct pingpong {
	int fd;
	int in;	 /* pipe from the main process (without --eventfd) */
	int in_peer; /* its write end: the service's copy must go, or it never sees EOF */
	int efd; /* the eventfd of 0x1000 (with --eventfd) */
	volatile int stop;
	volatile unsigned long irqs;
	volatile unsigned long notifies; /* counted by the eventfd service */
	struct service *svc;
};

#define PINGPONG_ADDR 0x1000
#define PINGPONG_IRQ 3

/* Without --eventfd: one byte from the main process per NOTIFY it read; one IRQ for each. */
static int pingpong_pipe_service(void *arg)
{
	struct pingpong *p = arg;
	sys_close(p->in_peer);
	for (;;) {
		char c;
		long n = sys_read(p->in, &c, 1);
		if (n == -EINTR)
			continue;
		if (n == 0)
			return 0; /* the main process is done */
		if (n < 0)
			service_fail(p->svc, "reading the pipe", n);
		long r = raise_irq(p->fd, PINGPONG_IRQ);
		if (r == -ENOENT)
			service_guest_gone(p->svc);
		if (r != 0)
			service_fail(p->svc, "Triggering irq", r);
		__atomic_add_fetch(&p->irqs, 1, __ATOMIC_SEQ_CST);
	}
}

/* With --eventfd: the kernel counts the NOTIFYs; one IRQ per count. */
static int pingpong_eventfd_service(void *arg)
{
	struct pingpong *p = arg;
	for (;;) {
		uint64_t count;
		long n = sys_read(p->efd, &count, sizeof(count));
		if (n == -EINTR)
			continue;
		if (n != (long)sizeof(count))
			service_fail(p->svc, "reading the eventfd", n);
		if (__atomic_load_n(&p->stop, __ATOMIC_SEQ_CST))
			return 0; /* the main process's stop token */
		__atomic_add_fetch(&p->notifies, (unsigned long)count, __ATOMIC_SEQ_CST);
		for (uint64_t i = 0; i < count; i++) {
			long r = raise_irq(p->fd, PINGPONG_IRQ);
			if (r == -ENOENT)
				service_guest_gone(p->svc);
			if (r != 0)
				service_fail(p->svc, "Triggering irq", r);
			__atomic_add_fetch(&p->irqs, 1, __ATOMIC_SEQ_CST);
		}
	}
}

static int cmd_pingpong(unsigned long n, int use_eventfd)
{
	static struct pingpong p;
	struct guest g;
	guest_map(&g, TEST_MEM, TEST_EXTRA_PAGES, DEFAULT_START);
	p.fd = open_or_die();
	lg_initialize(p.fd, &g);
	int to_service = -1;
	if (use_eventfd) {
		p.efd = eventfd(0, 0);
		if (p.efd < 0)
			fatal("eventfd: %s", strerror(errno));
		attach_eventfd(p.fd, PINGPONG_ADDR, p.efd);
		p.svc = service_start("pingpong-eventfd", pingpong_eventfd_service, &p);
	} else {
		int pp[2];
		if (pipe(pp) != 0)
			fatal("pipe: %s", strerror(errno));
		p.in = pp[0];
		p.in_peer = pp[1];
		to_service = pp[1];
		p.svc = service_start("pingpong-irq", pingpong_pipe_service, &p);
		close(pp[0]);
	}
	unsigned long read_notifies = 0;
	double t0 = now_seconds();
	char reason[1024];
	for (;;) {
		word addr = 0;
		struct res r = lg_read(p.fd, &addr, sizeof(addr), 0);
		if (r.ret == W) {
			if (addr != PINGPONG_ADDR)
				fatal("pingpong: NOTIFY %#lx, want %#x", addr, PINGPONG_ADDR);
			read_notifies++;
			if (use_eventfd) {
				/* The eventfd should have taken it; keep the Guest going anyway. */
				struct res i = lg_req(p.fd, 0, 2, LHREQ_IRQ, PINGPONG_IRQ, 0, 0);
				if (i.ret != 0)
					fatal("Triggering irq: %s", describe(i, reason, sizeof(reason)));
				__atomic_add_fetch(&p.irqs, 1, __ATOMIC_SEQ_CST);
			} else if (write(to_service, "n", 1) != 1) {
				fatal("pingpong: write to the service: %s", strerror(errno));
			}
			continue;
		}
		if (r.ret >= 0)
			fatal("Running guest failed: read returned %ld, not %ld", r.ret, W);
		if (r.err == EINTR)
			continue;
		if (r.err == ENOENT)
			break;
		fatal("Running guest failed: %s", strerror(r.err));
	}
	double seconds = now_seconds() - t0;
	read_reason(p.fd, reason, sizeof(reason));
	/* Let the service finish what it was given, then stop it. */
	p.svc->expected = 1;
	if (use_eventfd) {
		__atomic_store_n(&p.stop, 1, __ATOMIC_SEQ_CST);
		uint64_t one = 1;
		if (write(p.efd, &one, sizeof(one)) != (ssize_t)sizeof(one))
			fatal("pingpong: stop the service: %s", strerror(errno));
	} else {
		close(to_service);
	}
	int status = service_join(p.svc);
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		fatal("pingpong: the service ended with status %#x: %s", status, p.svc->error);
	unsigned long notifies = p.notifies + read_notifies;
	printf("notifies %lu irqs %lu seconds %.3f\n", notifies, p.irqs, seconds);
	if (use_eventfd && read_notifies)
		printf("notifies that reached the read despite the eventfd: %lu\n", read_notifies);
	printf("reason: %s\n", reason);
	close(p.fd);
	int ok = notifies == n && p.irqs == n && !(use_eventfd && read_notifies);
	return ok ? EXIT_OK : EXIT_GUEST;
}

/* ---------------------------------------------------------------- attach-while-blocked */

#define ATTACH_ADDR 0x2000
#define ATTACH_IRQ 5

struct attach {
	int fd;
	pid_t reader_tid;
	volatile int read_done;
	int keep; /* a dup of the eventfd: counts what the kernel signalled */
	int blocked;
	char seen[96];
	struct res eventfd_res, irq_res;
};

/* Thread `tid` of this process: sleeping ('S') inside `nr`? Fills `seen` with what it saw. */
static int task_sleeps_in(pid_t tid, long nr, char *seen, size_t len)
{
	char path[64], text[512];
	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", (int)tid);
	FILE *f = fopen(path, "r");
	if (!f)
		return 0;
	long in = -1;
	int have = fscanf(f, "%ld", &in) == 1;
	fclose(f);
	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
	f = fopen(path, "r");
	if (!f)
		return 0;
	size_t n = fread(text, 1, sizeof(text) - 1, f);
	fclose(f);
	text[n] = '\0';
	const char *close_paren = strrchr(text, ')');
	char state = close_paren && close_paren[1] == ' ' ? close_paren[2] : '?';
	snprintf(seen, len, "syscall %ld state %c", have ? in : -1L, state);
	return have && in == nr && state == 'S';
}

static void *attach_thread(void *arg)
{
	struct attach *a = arg;
	double deadline = now_seconds() + 20;
	while (!a->read_done && now_seconds() < deadline) {
		if (task_sleeps_in(a->reader_tid, SYS_pread64, a->seen, sizeof(a->seen))) {
			a->blocked = 1;
			break;
		}
		sched_yield();
	}
	if (!a->blocked)
		return NULL;
	int efd = eventfd(0, 0);
	if (efd < 0)
		fatal("eventfd: %s", strerror(errno));
	a->keep = dup(efd);
	a->eventfd_res = lg_req(a->fd, 0, 3, LHREQ_EVENTFD, ATTACH_ADDR, (word)efd, 0);
	close(efd);
	a->irq_res = lg_req(a->fd, 0, 2, LHREQ_IRQ, ATTACH_IRQ, 0, 0);
	return NULL;
}

static int cmd_attach(void)
{
	static struct attach a;
	struct guest g;
	char got[160], want[96];
	guest_map(&g, TEST_MEM, TEST_EXTRA_PAGES, DEFAULT_START);
	a.fd = open_or_die();
	lg_initialize(a.fd, &g);
	a.reader_tid = gettid();
	a.keep = -1;
	pthread_t th;
	int e = pthread_create(&th, NULL, attach_thread, &a);
	if (e)
		fatal("pthread_create: %s", strerror(e));
	/* The Guest waits for IRQ 5 first, so this read blocks until the thread acts. */
	unsigned long reached = 0;
	word addr = 0, first_addr = 0;
	struct res r;
	for (;;) {
		r = lg_read(a.fd, &addr, sizeof(addr), 0);
		if (r.ret == W && reached++ < 16) {
			if (reached == 1)
				first_addr = addr;
			continue;
		}
		if (r.ret < 0 && r.err == EINTR)
			continue;
		break;
	}
	__atomic_store_n(&a.read_done, 1, __ATOMIC_SEQ_CST);
	pthread_join(th, NULL);

	snprintf(want, sizeof(want), "syscall %ld state S", (long)SYS_pread64);
	report(a.blocked, "attach-initializer-sleeps-in-pread",
	       a.seen[0] ? a.seen : "no /proc state", want);
	if (a.blocked) {
		expect("attach-eventfd-from-second-thread-returns-0", a.eventfd_res, 0, 0);
		expect("attach-irq-5-from-second-thread-returns-0", a.irq_res, 0, 0);
	}
	expect("attach-read-ends-enoent", r, 0, ENOENT);
	if (reached)
		snprintf(got, sizeof(got), "%lu NOTIFY returns, the first %#lx", reached, first_addr);
	else
		snprintf(got, sizeof(got), "no NOTIFY returned");
	report(!reached, "attach-read-never-returned-0x2000", got, "no NOTIFY returned");
	char reason[1024];
	memset(reason, 0xAA, sizeof(reason));
	static const char want_reason[] = "CRASH: attached";
	r = lg_read(a.fd, reason, 1023, 0);
	expect_bytes("attach-reason", r, reason, want_reason, (long)sizeof(want_reason));
	uint64_t count = 0;
	if (a.keep >= 0) {
		fcntl(a.keep, F_SETFL, O_NONBLOCK);
		if (read(a.keep, &count, sizeof(count)) != (ssize_t)sizeof(count))
			count = 0;
		close(a.keep);
	}
	snprintf(got, sizeof(got), "count %" PRIu64, count);
	report(count == 1, "attach-eventfd-counted-1", got, "count 1");
	close(a.fd);
	printf("attach-while-blocked: %d cases, %d failed\n", cases, failures);
	return failures ? EXIT_GUEST : EXIT_OK;
}

/* ---------------------------------------------------------------- hold */

/* INITIALIZE, say so, and sit in read until killed (halt.guest never comes back). A NOTIFY is
 * printed and read again; a death ends it as the console does. */
static int cmd_hold(void)
{
	struct guest g;
	guest_map(&g, TEST_MEM, TEST_EXTRA_PAGES, DEFAULT_START);
	int fd = open_or_die();
	lg_initialize(fd, &g);
	printf("reading\n");
	fflush(stdout);
	for (;;) {
		word addr = 0;
		struct res r = lg_read(fd, &addr, sizeof(addr), 0);
		if (r.ret == W) {
			printf("notify %#lx\n", addr);
			fflush(stdout);
			continue;
		}
		if (r.ret >= 0)
			fatal("Running guest failed: read returned %ld, not %ld", r.ret, W);
		if (r.err == EINTR)
			continue;
		if (r.err == ENOENT) {
			char reason[1024];
			read_reason(fd, reason, sizeof(reason));
			fprintf(stderr, "lguest: %s\n", reason);
			return EXIT_GUEST;
		}
		fatal("Running guest failed: %s", strerror(r.err));
	}
}

/* ---------------------------------------------------------------- bench */

struct pipe_floor {
	int in, out;
	int in_peer, out_peer; /* the ends the service must not keep (see pingpong) */
	struct service *svc;
};

/* The floor's other end: echo every byte back. */
static int floor_service(void *arg)
{
	struct pipe_floor *f = arg;
	sys_close(f->in_peer);
	sys_close(f->out_peer);
	for (;;) {
		char c;
		long n = sys_read(f->in, &c, 1);
		if (n == -EINTR)
			continue;
		if (n == 0)
			return 0;
		if (n < 0)
			service_fail(f->svc, "floor: reading the pipe", n);
		n = sys_write(f->out, &c, 1);
		if (n != 1)
			service_fail(f->svc, "floor: writing the pipe", n);
	}
}

/* What the machine gives anyway: a pipe round trip between us and a clone'd process, the
 * least a read-notify-answer through another process can cost. Round trips per second. */
static double pipe_floor(double seconds)
{
	static struct pipe_floor f;
	int to[2], back[2];
	if (pipe(to) != 0 || pipe(back) != 0)
		fatal("pipe: %s", strerror(errno));
	f.in = to[0];
	f.out = back[1];
	f.in_peer = to[1];
	f.out_peer = back[0];
	f.svc = service_start("floor", floor_service, &f);
	close(to[0]);
	close(back[1]);
	unsigned long ops = 0;
	double t0 = now_seconds(), t;
	do {
		char c = 'p';
		if (write(to[1], &c, 1) != 1 || read(back[0], &c, 1) != 1)
			fatal("floor: pipe round trip: %s", strerror(errno));
		ops++;
	} while ((t = now_seconds()) < t0 + seconds);
	f.svc->expected = 1;
	close(to[1]);
	service_join(f.svc);
	close(back[0]);
	return (double)ops / (t - t0);
}

struct bench_eventfd {
	int efd;
	volatile unsigned long notifies;
	struct service *svc;
};

static int bench_eventfd_service(void *arg)
{
	struct bench_eventfd *b = arg;
	for (;;) {
		uint64_t count;
		long n = sys_read(b->efd, &count, sizeof(count));
		if (n == -EINTR)
			continue;
		if (n != (long)sizeof(count))
			service_fail(b->svc, "reading the eventfd", n);
		__atomic_add_fetch(&b->notifies, (unsigned long)count, __ATOMIC_SEQ_CST);
	}
}

static volatile sig_atomic_t alarms;

/* SIGALRM, installed without SA_RESTART: the first one ends the bench's read with EINTR. The
 * timer repeats every second; ten more and the read plainly does not end, so we give up. */
static void on_alarm(int sig)
{
	(void)sig;
	if (++alarms > 10) {
		write_stderr("lguest-launcher: bench: the read did not end with EINTR within 10 s "
			     "of the signal\n");
		for (int j = 0; j < MAX_SERVICES; j++)
			if (services[j].pid > 0) {
				services[j].expected = 1;
				kill(services[j].pid, SIGKILL);
			}
		_exit(EXIT_GUEST);
	}
}

static void print_bench(const char *what, unsigned long ops, double seconds, double floor)
{
	double rate = (double)ops / seconds;
	printf("bench %s ops %lu seconds %.3f rate %.0f/s floor %.0f/s ratio %.3f\n", what, ops,
	       seconds, rate, floor, rate / floor);
}

static int cmd_bench(double seconds, int use_eventfd)
{
	double floor = pipe_floor(seconds);
	struct guest g;
	guest_map(&g, TEST_MEM, TEST_EXTRA_PAGES, DEFAULT_START);
	int fd = open_or_die();
	lg_initialize(fd, &g);
	char reason[1024];
	if (!use_eventfd) {
		/* bench-read.guest: every read returns a NOTIFY of 0x1000. */
		unsigned long ops = 0;
		double t0 = now_seconds(), t;
		do {
			word addr = 0;
			struct res r = lg_read(fd, &addr, sizeof(addr), 0);
			if (r.ret == W) {
				if (addr != 0x1000)
					fatal("bench: NOTIFY %#lx, want 0x1000", addr);
				ops++;
			} else if (r.ret >= 0) {
				fatal("Running guest failed: read returned %ld, not %ld", r.ret, W);
			} else if (r.err == ENOENT) {
				read_reason(fd, reason, sizeof(reason));
				fatal("bench: the Guest died: %s", reason);
			} else if (r.err != EINTR) {
				fatal("Running guest failed: %s", strerror(r.err));
			}
		} while ((t = now_seconds()) < t0 + seconds);
		print_bench("read-round-trips", ops, t - t0, floor);
		close(fd);
		return EXIT_OK;
	}
	/* bench-eventfd.guest: NOTIFY 0x2000 forever; the eventfd takes every one of them and
	 * the read returns only when our signal interrupts it. */
	static struct bench_eventfd b;
	b.efd = eventfd(0, 0);
	if (b.efd < 0)
		fatal("eventfd: %s", strerror(errno));
	attach_eventfd(fd, 0x2000, b.efd);
	b.svc = service_start("bench-eventfd", bench_eventfd_service, &b);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sa.sa_flags = 0; /* no SA_RESTART: the read must end with EINTR */
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGALRM, &sa, NULL) != 0)
		fatal("sigaction SIGALRM: %s", strerror(errno));
	struct itimerval it;
	memset(&it, 0, sizeof(it));
	it.it_value.tv_sec = (time_t)seconds;
	it.it_value.tv_usec = (suseconds_t)((seconds - (double)it.it_value.tv_sec) * 1e6);
	if (it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0)
		it.it_value.tv_usec = 1;
	it.it_interval.tv_sec = 1;
	double t0 = now_seconds();
	if (setitimer(ITIMER_REAL, &it, NULL) != 0)
		fatal("setitimer: %s", strerror(errno));
	unsigned long reached = 0;
	for (;;) {
		word addr = 0;
		struct res r = lg_read(fd, &addr, sizeof(addr), 0);
		if (r.ret == W) {
			reached++;
			continue;
		}
		if (r.ret >= 0)
			fatal("Running guest failed: read returned %ld, not %ld", r.ret, W);
		if (r.err == EINTR && alarms)
			break;
		if (r.err == EINTR)
			continue;
		if (r.err == ENOENT) {
			read_reason(fd, reason, sizeof(reason));
			fatal("bench: the Guest died: %s", reason);
		}
		fatal("Running guest failed: %s", strerror(r.err));
	}
	double t = now_seconds();
	memset(&it, 0, sizeof(it));
	setitimer(ITIMER_REAL, &it, NULL);
	/* The Guest runs only inside our read: after it, the count no longer grows (but the
	 * service may still be adding the last kick). */
	service_kill(b.svc);
	unsigned long ops = __atomic_load_n(&b.notifies, __ATOMIC_SEQ_CST);
	print_bench("eventfd-notifies", ops, t - t0, floor);
	close(fd);
	if (reached) {
		fprintf(stderr, "lguest-launcher: bench: %lu NOTIFYs reached the read despite the "
				"eventfd\n",
			reached);
		return EXIT_GUEST;
	}
	return EXIT_OK;
}

/* ---------------------------------------------------------------- main */

static const char USAGE[] =
	"usage: lguest-launcher [--dev PATH] [--plain-write] [--libc-irq] SUBCOMMAND ...\n"
	"\n"
	"A Launcher for /dev/lguest as in Linux 3.x (LHREQ_INITIALIZE / IRQ / EVENTFD), built\n"
	"with a word of %ld bytes. The Guest is whatever the device serves: cusedev's tests\n"
	"select a fakehost Guest script (fixtures/lguest/) before running a subcommand.\n"
	"\n"
	"Global options:\n"
	"  --dev PATH      the device (default /dev/lguest)\n"
	"  --plain-write   send cpu-0 requests with write(2) at the file position, as the 3.x\n"
	"                  Launcher did, instead of pwrite(2) at offset 0 (on a FUSE file the\n"
	"                  kernel moves the position by each write's result: expect cpu EINVAL)\n"
	"  --libc-irq      service processes raise interrupts with libc's pwrite (or write),\n"
	"                  as the 3.x Launcher's did, instead of raw system calls (which an\n"
	"                  LD_PRELOAD library such as cusedev's preload frontend cannot see)\n"
	"  --help          this text\n"
	"\n"
	"Subcommands:\n"
	"  console [--mem MIB] [--max-restarts N] [CMDLINE...]\n"
	"      The console-only Launcher of spec §4/§7 (any console Guest script). MIB MiB of RAM\n"
	"      (default 16) with boot_params at 0 (one e820 RAM entry, the command line after it,\n"
	"      default \"console=hvc0\"), the device page at gpa MEM with one console (2 vqs of\n"
	"      256, irqs 1 and 2, vrings at pfn MEM/4096+1 and +4), then INITIALIZE and read.\n"
	"      NOTIFYs of strings are printed (early console); console output goes to stdout.\n"
	"      The Guest's death prints \"lguest: REASON\" on stderr and exits 1; a restart\n"
	"      re-executes the Launcher, at most N times (default 3), then exits 3.\n"
	"  errno [--cuse]\n"
	"      Guest errno.guest. The /dev/lguest error table (spec §3), one line per case:\n"
	"      \"ok NAME: got X want Y\" or \"FAIL NAME: ...\", then \"errno: N cases, F failed\".\n"
	"      --cuse skips the cases that need a file offset (CUSE always passes 0).\n"
	"  pingpong N [--eventfd]\n"
	"      Guest pingpong.guest. Each NOTIFY 0x1000 is answered with IRQ 3 by a clone'd\n"
	"      service; with --eventfd the NOTIFYs go to an eventfd and never reach the read.\n"
	"      Prints \"notifies N irqs M seconds S\" and \"reason: REASON\"; exit 0 iff both\n"
	"      counts are N.\n"
	"  attach-while-blocked\n"
	"      Guest attach.guest. While the initializing thread sleeps in pread, a second\n"
	"      thread attaches an eventfd for 0x2000 and raises IRQ 5; the read must end with\n"
	"      ENOENT without returning 0x2000, and the eventfd must count 1. Case lines.\n"
	"  hold\n"
	"      Any Guest that halts (halt.guest). INITIALIZE, print \"reading\", and read until\n"
	"      killed; NOTIFYs are printed as \"notify ADDR\", a death exits 1.\n"
	"  bench SECONDS [--eventfd]\n"
	"      Guest bench-read.guest: read round trips per second; with --eventfd\n"
	"      bench-eventfd.guest: eventfd-counted NOTIFYs per second until a signal ends the\n"
	"      read (EINTR). Both against a floor (pipe ping-pong with a clone'd process):\n"
	"      \"bench read-round-trips|eventfd-notifies ops N seconds S rate R/s floor F/s ratio X\"\n"
	"\n"
	"Exit status: 0 ok; 1 the Guest died, a case failed or an error; 2 usage; 3 restart limit.\n";

static void help(void)
{
	printf(USAGE, W);
	exit(EXIT_OK);
}

int main(int argc, char **argv)
{
	saved_argv = argv;
	launcher_pid = getpid();
	signal(SIGPIPE, SIG_IGN);
	if (sysconf(_SC_PAGESIZE) != (long)PAGE)
		fatal("this Launcher assumes 4 KiB pages, not %ld", sysconf(_SC_PAGESIZE));
	int i = 1;
	for (; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
			help();
		else if (!strcmp(argv[i], "--plain-write"))
			plain_write = 1;
		else if (!strcmp(argv[i], "--libc-irq"))
			libc_irq = 1;
		else if (!strcmp(argv[i], "--dev") && i + 1 < argc)
			device = argv[++i];
		else if (!strcmp(argv[i], "--dev"))
			usage_error("--dev needs a PATH");
		else
			usage_error("unknown option %s", argv[i]);
	}
	if (i >= argc)
		usage_error("no subcommand");
	const char *cmd = argv[i++];
	int flag_eventfd = 0, flag_cuse = 0;
	unsigned long mem_mib = 16, max_restarts = 3;
	int is_console = !strcmp(cmd, "console");
	const char *positional[64];
	int npos = 0, only_positional = 0;
	for (; i < argc; i++) {
		const char *a = argv[i];
		int has_value = i + 1 < argc;
		if (only_positional || a[0] != '-') {
			if (npos == 64)
				usage_error("%s: too many arguments", cmd);
			positional[npos++] = a;
		} else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			help();
		} else if (!strcmp(a, "--eventfd") &&
			   (!strcmp(cmd, "pingpong") || !strcmp(cmd, "bench"))) {
			flag_eventfd = 1;
		} else if (!strcmp(a, "--cuse") && !strcmp(cmd, "errno")) {
			flag_cuse = 1;
		} else if (is_console && (!strcmp(a, "--mem") || !strcmp(a, "--max-restarts"))) {
			if (!has_value)
				usage_error("console: %s needs a value", a);
			unsigned long v = parse_number(argv[++i], a);
			if (!strcmp(a, "--mem"))
				mem_mib = v;
			else
				max_restarts = v;
		} else if (is_console && !strcmp(a, "--")) {
			only_positional = 1;
		} else {
			usage_error("%s: unknown option %s", cmd, a);
		}
	}
	if (!strcmp(cmd, "console")) {
		char cmdline[4096] = "";
		for (int k = 0; k < npos; k++) {
			if (strlen(cmdline) + strlen(positional[k]) + 2 > sizeof(cmdline))
				usage_error("console: the command line is too long");
			if (k)
				strcat(cmdline, " ");
			strcat(cmdline, positional[k]);
		}
		if (max_restarts > UINT_MAX)
			usage_error("console: --max-restarts %lu is too many", max_restarts);
		return cmd_console(mem_mib, (unsigned)max_restarts,
				   npos ? cmdline : "console=hvc0");
	}
	if (!strcmp(cmd, "errno")) {
		if (npos)
			usage_error("errno: unexpected argument %s", positional[0]);
		return cmd_errno(flag_cuse);
	}
	if (!strcmp(cmd, "pingpong")) {
		if (npos != 1)
			usage_error("pingpong: want N, the Guest's round trips (pingpong.guest: 1000)");
		return cmd_pingpong(parse_number(positional[0], "pingpong N"), flag_eventfd);
	}
	if (!strcmp(cmd, "attach-while-blocked")) {
		if (npos)
			usage_error("attach-while-blocked: unexpected argument %s", positional[0]);
		return cmd_attach();
	}
	if (!strcmp(cmd, "hold")) {
		if (npos)
			usage_error("hold: unexpected argument %s", positional[0]);
		return cmd_hold();
	}
	if (!strcmp(cmd, "bench")) {
		if (npos != 1)
			usage_error("bench: want SECONDS");
		unsigned long seconds = parse_number(positional[0], "bench SECONDS");
		if (seconds == 0 || seconds > 3600)
			usage_error("bench: SECONDS 1..3600, not %lu", seconds);
		return cmd_bench((double)seconds, flag_eventfd);
	}
	usage_error("unknown subcommand %s", cmd);
}
