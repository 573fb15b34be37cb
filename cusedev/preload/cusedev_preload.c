/*
 * libcusedev-preload: the client half of cusedev's "preload" frontend (docs/preload.md).
 *
 * Loaded with LD_PRELOAD into an unmodified program, it answers the calls the program makes
 * on the device paths cusedev serves (CUSEDEV_PRELOAD_PATHS), the way fs/fuse/cuse.c and
 * fs/fuse/file.c of Linux 6.1 would on a real CUSE node: an open becomes FUSE_OPEN on a
 * socket of its own (that socket *is* the open file), and every read, write, ioctl, poll and
 * fstat on it becomes one request on a fresh socketpair whose other end rides along with
 * SCM_RIGHTS. cusedev (cusedev/src/preload/) plays the rest of the kernel. Every other call
 * goes straight to the next definition (libc), at the cost of a load and a compare.
 *
 * Why C and not Rust: open, openat, ioctl and fcntl are variadic, and stable Rust cannot
 * define a variadic function; 32-bit clients need a 32-bit library and this machine has no
 * i686 Rust target; and a Rust runtime (std, its allocator, its panic machinery) does not
 * belong in every process a test starts, nor in a read() called from a signal handler.
 *
 * Rules the code keeps:
 *  - No malloc, no locks on the read/write/ioctl/poll paths (they may run in a signal
 *    handler, or in a child forked while another thread was inside): stack buffers, mmap,
 *    atomics. The one lock (epoll registrations) is taken by pthread_atfork around fork.
 *  - errno is touched only on failure, as a system call would.
 *  - Device descriptors are remembered in a table fd -> (st_dev, st_ino) of the socket. An
 *    entry is trusted only after fstat shows the same socket, and close() never drops one:
 *    the lguest Launcher makes its service processes with clone(CLONE_VM) (shared memory,
 *    separate descriptor tables), so what one process closes the other may still hold.
 *
 * Known differences from a real CUSE node (docs/preload.md lists them for users):
 *  - EPOLLET is served level-triggered; an epoll set holding a device cannot itself be
 *    polled or nested with the device's readiness in it.
 *  - Calls glibc makes internally (fopen, isatty, ...) and raw syscall(2)s are not seen.
 *  - openat() with a relative path, and O_PATH opens, are not recognised as device opens.
 *  - A write() whose buffer is only partly readable fails with EFAULT where the kernel
 *    would write the readable prefix.
 */

/* The fortified wrappers would be inline definitions of the very functions defined here. */
#undef _FORTIFY_SOURCE
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <linux/fuse.h>

#define EXPORT __attribute__((visibility("default")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* CUSE_MAX_IO (fs/fuse/cuse.c, 6.1): max_read and max_write of every CUSE connection. */
#define CUSE_MAX_IO (128u * 1024)
/* fc->max_pages of a CUSE connection: FUSE_DEFAULT_MAX_PAGES_PER_REQ (fs/fuse/fuse_i.h). */
#define CUSE_MAX_PAGES 32u
#define PAGE 4096u
/* MAX_RW_COUNT (include/linux/fs.h): what vfs_read/vfs_write clamp a count to. */
#define MAX_RW_COUNT ((size_t)(INT_MAX & ~(PAGE - 1)))
/* DEFAULT_POLLMASK (include/linux/poll.h): a file without a poll method. */
#define DEFAULT_POLLMASK (POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM)
/* fs/select.c: what select counts as readable, writable, exceptional. */
#define POLLIN_SET (POLLRDNORM | POLLRDBAND | POLLIN | POLLHUP | POLLERR)
#define POLLOUT_SET (POLLWRBAND | POLLWRNORM | POLLOUT | POLLERR)
#define POLLEX_SET (POLLPRI)
/* The event bits mangle_poll() carries to a driver; the rest of an epoll mask are flags. */
#define POLL_BITS                                                                          \
	(POLLIN | POLLPRI | POLLOUT | POLLERR | POLLHUP | POLLNVAL | POLLRDNORM | POLLRDBAND | \
	 POLLWRNORM | POLLWRBAND | POLLMSG | POLLRDHUP)
/* What F_SETFL may change (fs/fcntl.c SETFL_MASK): those live on the socket itself. */
#define SETFL_MASK (O_APPEND | O_NONBLOCK | O_NDELAY | O_DIRECT | O_NOATIME | O_ASYNC)

#if __SIZEOF_POINTER__ == 4
/* A 32-bit process: the kernel would take compat_ioctl (cuse_file_compat_ioctl). */
#define IOCTL_FLAGS (FUSE_IOCTL_UNRESTRICTED | FUSE_IOCTL_COMPAT)
#define OPEN_FORCED 0
/* i386 glibc's _STAT_VER_LINUX: the layout __xstat and friends fill. */
#define XSTAT_VER_OK(v) ((v) == 3)
#else
#define IOCTL_FLAGS FUSE_IOCTL_UNRESTRICTED
/* force_o_largefile(): a 64-bit kernel adds O_LARGEFILE to every open (fs/open.c); glibc
 * defines O_LARGEFILE as 0 for 64-bit programs, so the kernel's value is spelled out. */
#define OPEN_FORCED 0100000
#define XSTAT_VER_OK(v) ((v) == 0 || (v) == 1)
/* TASK_SIZE_MAX with 4-level paging: the limit of access_ok() (arch/x86). */
#define TASK_SIZE_MAX ((uintptr_t)0x7ffffffff000ull)
#endif

/* ---------------------------------------------------------------------------------------
 * The next definitions, found lazily (another library's constructor may call us before ours
 * runs) and thread-safely (a racing lookup finds the same pointer).
 */

static long no_such_function(void)
{
	errno = ENOSYS;
	return -1;
}

static void *resolve(void **slot, const char *name)
{
	void *p = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
	if (UNLIKELY(p == NULL)) {
		p = dlsym(RTLD_NEXT, name);
		if (p == NULL)
			p = (void *)no_such_function;
		__atomic_store_n(slot, p, __ATOMIC_RELEASE);
	}
	return p;
}

#define REAL_DECL(ret, name, args) static ret(*real_##name) args
#define REAL(name) ((__typeof__(real_##name))resolve((void **)&real_##name, #name))

REAL_DECL(int, open, (const char *, int, ...));
REAL_DECL(int, open64, (const char *, int, ...));
REAL_DECL(int, openat, (int, const char *, int, ...));
REAL_DECL(int, openat64, (int, const char *, int, ...));
REAL_DECL(int, __open_2, (const char *, int));
REAL_DECL(int, __open64_2, (const char *, int));
REAL_DECL(int, __openat_2, (int, const char *, int));
REAL_DECL(int, __openat64_2, (int, const char *, int));
REAL_DECL(int, creat, (const char *, mode_t));
REAL_DECL(int, creat64, (const char *, mode_t));
REAL_DECL(ssize_t, read, (int, void *, size_t));
REAL_DECL(ssize_t, __read_chk, (int, void *, size_t, size_t));
REAL_DECL(ssize_t, write, (int, const void *, size_t));
REAL_DECL(ssize_t, pread, (int, void *, size_t, off_t));
REAL_DECL(ssize_t, pread64, (int, void *, size_t, off64_t));
REAL_DECL(ssize_t, __pread_chk, (int, void *, size_t, off_t, size_t));
REAL_DECL(ssize_t, __pread64_chk, (int, void *, size_t, off64_t, size_t));
REAL_DECL(ssize_t, pwrite, (int, const void *, size_t, off_t));
REAL_DECL(ssize_t, pwrite64, (int, const void *, size_t, off64_t));
REAL_DECL(ssize_t, readv, (int, const struct iovec *, int));
REAL_DECL(ssize_t, writev, (int, const struct iovec *, int));
REAL_DECL(int, ioctl, (int, unsigned long, ...));
REAL_DECL(int, poll, (struct pollfd *, nfds_t, int));
REAL_DECL(int, __poll_chk, (struct pollfd *, nfds_t, int, size_t));
REAL_DECL(int, ppoll, (struct pollfd *, nfds_t, const struct timespec *, const sigset_t *));
REAL_DECL(int, __ppoll_chk,
	  (struct pollfd *, nfds_t, const struct timespec *, const sigset_t *, size_t));
REAL_DECL(int, select, (int, fd_set *, fd_set *, fd_set *, struct timeval *));
REAL_DECL(int, pselect,
	  (int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *));
REAL_DECL(int, epoll_ctl, (int, int, int, struct epoll_event *));
REAL_DECL(int, epoll_wait, (int, struct epoll_event *, int, int));
REAL_DECL(int, epoll_pwait, (int, struct epoll_event *, int, int, const sigset_t *));
REAL_DECL(int, epoll_pwait2,
	  (int, struct epoll_event *, int, const struct timespec *, const sigset_t *));
REAL_DECL(int, close, (int));
REAL_DECL(int, dup, (int));
REAL_DECL(int, dup2, (int, int));
REAL_DECL(int, dup3, (int, int, int));
REAL_DECL(int, fcntl, (int, int, ...));
REAL_DECL(int, fcntl64, (int, int, ...));
REAL_DECL(int, fstat, (int, struct stat *));
REAL_DECL(int, fstat64, (int, struct stat64 *));
REAL_DECL(int, stat, (const char *, struct stat *));
REAL_DECL(int, stat64, (const char *, struct stat64 *));
REAL_DECL(int, lstat, (const char *, struct stat *));
REAL_DECL(int, lstat64, (const char *, struct stat64 *));
REAL_DECL(int, fstatat, (int, const char *, struct stat *, int));
REAL_DECL(int, fstatat64, (int, const char *, struct stat64 *, int));
REAL_DECL(int, __xstat, (int, const char *, struct stat *));
REAL_DECL(int, __xstat64, (int, const char *, struct stat64 *));
REAL_DECL(int, __lxstat, (int, const char *, struct stat *));
REAL_DECL(int, __lxstat64, (int, const char *, struct stat64 *));
REAL_DECL(int, __fxstat, (int, int, struct stat *));
REAL_DECL(int, __fxstat64, (int, int, struct stat64 *));
REAL_DECL(int, __fxstatat, (int, int, const char *, struct stat *, int));
REAL_DECL(int, __fxstatat64, (int, int, const char *, struct stat64 *, int));
REAL_DECL(int, statx, (int, const char *, int, unsigned int, struct statx *));

/* glibc ≥ 2.33 no longer declares these, and the _chk ones only under _FORTIFY_SOURCE. */
int __open_2(const char *, int);
int __open64_2(const char *, int);
int __openat_2(int, const char *, int);
int __openat64_2(int, const char *, int);
ssize_t __read_chk(int, void *, size_t, size_t);
ssize_t __pread_chk(int, void *, size_t, off_t, size_t);
ssize_t __pread64_chk(int, void *, size_t, off64_t, size_t);
int __poll_chk(struct pollfd *, nfds_t, int, size_t);
int __ppoll_chk(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *, size_t);
int __xstat(int, const char *, struct stat *);
int __xstat64(int, const char *, struct stat64 *);
int __lxstat(int, const char *, struct stat *);
int __lxstat64(int, const char *, struct stat64 *);
int __fxstat(int, int, struct stat *);
int __fxstat64(int, int, struct stat64 *);
int __fxstatat(int, int, const char *, struct stat *, int);
int __fxstatat64(int, int, const char *, struct stat64 *, int);

/* ---------------------------------------------------------------------------------------
 * Configuration, read once by the constructor and never freed (environ may change later).
 */

#define MAX_PATHS 64
static const char *g_paths[MAX_PATHS];
static size_t g_path_len[MAX_PATHS];
static int g_npaths;
static const char *g_root = "";
static size_t g_root_len;
static struct sockaddr_un g_addr;
static socklen_t g_addr_len;
static dev_t g_root_dev; /* st_dev of a device node: that of the device root directory */

/* ---------------------------------------------------------------------------------------
 * The device-descriptor table: one slot per descriptor number, mapped on the first device
 * open (MAP_NORESERVE: only touched pages cost memory). Slots are written and read with
 * atomics on `state`, so no lock is ever needed (fork, signal handlers).
 */

struct slot {
	uint32_t state; /* 0: no device; else 1 + the open's access mode */
	uint32_t flags; /* the open's file flags (those F_SETFL cannot change) */
	uint64_t ino;   /* the socket that is the open file */
	uint64_t dev;
};

static struct slot *g_table;
static int g_size;
/* Set once a clone(CLONE_VM) without CLONE_FILES was made: the table is then shared by
 * processes with different descriptor tables, and a stale slot may be another's live one. */
static int g_shared;
static uint32_t g_unique;

static int ensure_table(void)
{
	if (__atomic_load_n(&g_table, __ATOMIC_ACQUIRE) != NULL)
		return 0;
	struct rlimit lim;
	rlim_t n = 1024;
	if (getrlimit(RLIMIT_NOFILE, &lim) == 0) {
		/* The hard limit, so a later setrlimit up to it keeps working; capped at the
		 * default fs.nr_open, beyond which no descriptor can exist anyway. */
		n = lim.rlim_max;
		if (n == RLIM_INFINITY || n > (1u << 20))
			n = 1u << 20;
		if (n < lim.rlim_cur && lim.rlim_cur != RLIM_INFINITY && lim.rlim_cur <= (1u << 20))
			n = lim.rlim_cur;
	}
	size_t bytes = (size_t)n * sizeof(struct slot);
	void *t = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
		       -1, 0);
	if (t == MAP_FAILED)
		return -1;
	struct slot *expected = NULL;
	__atomic_store_n(&g_size, (int)n, __ATOMIC_RELAXED);
	if (!__atomic_compare_exchange_n(&g_table, &expected, (struct slot *)t, 0, __ATOMIC_RELEASE,
					 __ATOMIC_ACQUIRE))
		munmap(t, bytes);
	return 0;
}

/* The slot of `fd` if it names a device file now, validated against the socket. */
static struct slot *device_slot(int fd)
{
	struct slot *t = __atomic_load_n(&g_table, __ATOMIC_ACQUIRE);
	if (LIKELY(t == NULL))
		return NULL;
	if ((unsigned)fd >= (unsigned)__atomic_load_n(&g_size, __ATOMIC_RELAXED))
		return NULL;
	struct slot *s = &t[fd];
	if (LIKELY(__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == 0))
		return NULL;
	int saved = errno;
	struct stat64 st;
	int ok = REAL(fstat64)(fd, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == s->ino &&
		 st.st_dev == s->dev;
	errno = saved;
	if (ok)
		return s;
	/* The number now names another file: drop the slot, unless it may be a live one of a
	 * process sharing this memory. */
	if (!__atomic_load_n(&g_shared, __ATOMIC_RELAXED))
		__atomic_store_n(&s->state, 0, __ATOMIC_RELEASE);
	return NULL;
}

static int slot_set(int fd, uint32_t accmode, uint32_t flags)
{
	struct stat64 st;
	if (ensure_table() != 0 || REAL(fstat64)(fd, &st) != 0)
		return -1;
	if ((unsigned)fd >= (unsigned)g_size)
		return -1;
	struct slot *s = &g_table[fd];
	s->flags = flags;
	s->ino = st.st_ino;
	s->dev = st.st_dev;
	__atomic_store_n(&s->state, 1 + accmode, __ATOMIC_RELEASE);
	return 0;
}

static void slot_copy(int from, const struct slot *s, int to)
{
	if ((unsigned)to >= (unsigned)g_size || to == from)
		return;
	struct slot *d = &g_table[to];
	d->flags = s->flags;
	d->ino = s->ino;
	d->dev = s->dev;
	__atomic_store_n(&d->state, __atomic_load_n(&s->state, __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
}

static uint32_t slot_accmode(const struct slot *s)
{
	return (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) - 1) & O_ACCMODE;
}

/* The file's f_flags as the kernel would send them: what F_SETFL changes lives on the socket
 * (shared by every descriptor of it, in every process), the rest was fixed at open. */
static uint32_t file_flags(int fd, const struct slot *s)
{
	int live = REAL(fcntl)(fd, F_GETFL);
	if (live < 0)
		live = 0;
	return ((uint32_t)live & SETFL_MASK) | (s->flags & ~(uint32_t)(SETFL_MASK | O_ACCMODE)) |
	       slot_accmode(s);
}

/* ---------------------------------------------------------------------------------------
 * Paths.
 */

/* The device name of `path` (relative to the device root) if it is a listed path. */
static const char *device_name(const char *path)
{
	if (LIKELY(g_npaths == 0) || path == NULL || path[0] != '/')
		return NULL;
	size_t len = strlen(path);
	for (int i = 0; i < g_npaths; i++) {
		if (len == g_path_len[i] && memcmp(path, g_paths[i], len) == 0) {
			if (g_root_len > 0 && strncmp(path, g_root, g_root_len) == 0 &&
			    path[g_root_len] == '/')
				return path + g_root_len + 1;
			return path + 1;
		}
	}
	return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Messages.
 */

static void in_header(struct fuse_in_header *h, uint32_t opcode, uint64_t unique, uint32_t len)
{
	memset(h, 0, sizeof(*h));
	h->len = len;
	h->opcode = opcode;
	h->unique = unique;
	h->uid = (uint32_t)geteuid();
	h->gid = (uint32_t)getegid();
	h->pid = (uint32_t)gettid();
}

static uint64_t next_unique(void)
{
	/* Even, like the kernel's: unique | 1 names the request's interrupt (fs/fuse/dev.c). */
	return (uint64_t)__atomic_add_fetch(&g_unique, 1, __ATOMIC_RELAXED) << 1;
}

static size_t iov_total(const struct iovec *iov, int n)
{
	size_t t = 0;
	for (int i = 0; i < n; i++)
		t += iov[i].iov_len;
	return t;
}

/* Sends one message, with `attach` as its one SCM_RIGHTS descriptor if >= 0. Blocks even
 * on a non-blocking socket (the kernel's request queue never refuses a request). A peer that
 * has gone reads as ENOTCONN. */
static int send_msg(int sock, struct iovec *iov, int n, int attach)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr m;
	memset(&m, 0, sizeof(m));
	m.msg_iov = iov;
	m.msg_iovlen = n;
	if (attach >= 0) {
		memset(&control, 0, sizeof(control));
		m.msg_control = control.buf;
		m.msg_controllen = sizeof(control.buf);
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &attach, sizeof(int));
	}
	for (;;) {
		if (sendmsg(sock, &m, MSG_NOSIGNAL) >= 0)
			return 0;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN) {
			struct pollfd p = {.fd = sock, .events = POLLOUT};
			REAL(poll)(&p, 1, -1);
			continue;
		}
		if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN || errno == ECONNREFUSED)
			errno = ENOTCONN;
		return -1;
	}
}

/* One call in flight: the caller's end `a` of its socketpair. */
struct call {
	int a;
	uint64_t unique;
	int interrupted; /* FUSE_INTERRUPT sent (once per request, as request_wait_answer) */
	int signalled;   /* a signal handler ran while waiting */
	int notified;    /* FUSE_NOTIFY_POLL arrived */
};

/* Makes the socketpair and sends the request (iov[0] is its fuse_in_header, whose len this
 * sets) on the file socket `fd` with `b` attached. */
static int call_start(struct call *c, int fd, uint32_t opcode, struct iovec *iov, int n)
{
	int sv[2];
	memset(c, 0, sizeof(*c));
	c->a = -1;
	c->unique = next_unique();
	in_header(iov[0].iov_base, opcode, c->unique, (uint32_t)iov_total(iov, n));
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
		return -1;
	int one = 1;
	setsockopt(sv[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));
	int r = send_msg(fd, iov, n, sv[1]);
	int e = errno;
	REAL(close)(sv[1]);
	if (r != 0) {
		REAL(close)(sv[0]);
		errno = e;
		return -1;
	}
	c->a = sv[0];
	return 0;
}

/* A further request of the same call (an ioctl retry), sent on `a` itself. */
static int call_again(struct call *c, uint32_t opcode, struct iovec *iov, int n)
{
	c->unique = next_unique();
	c->interrupted = 0;
	in_header(iov[0].iov_base, opcode, c->unique, (uint32_t)iov_total(iov, n));
	return send_msg(c->a, iov, n, -1);
}

static void call_end(struct call *c)
{
	if (c->a >= 0) {
		int e = errno;
		REAL(close)(c->a);
		errno = e;
		c->a = -1;
	}
}

static void send_interrupt(struct call *c)
{
	struct fuse_in_header h;
	struct fuse_interrupt_in in = {.unique = c->unique};
	in_header(&h, FUSE_INTERRUPT, c->unique | 1, sizeof(h) + sizeof(in));
	struct iovec iov[2] = {{&h, sizeof(h)}, {&in, sizeof(in)}};
	int e = errno;
	send_msg(c->a, iov, 2, -1); /* a gone cusedev shows as the end of `a` */
	errno = e;
	c->interrupted = 1;
}

/* Waits for the reply of the call's current request and receives it into iov (iov[0] is a
 * fuse_out_header). Returns its length, or -1 with errno: the reply's error, ECONNABORTED
 * when cusedev closed `b` without answering, EIO for a malformed reply. */
static ssize_t call_wait(struct call *c, struct iovec *iov, int n)
{
	for (;;) {
		struct pollfd p = {.fd = c->a, .events = POLLIN};
		if (REAL(poll)(&p, 1, -1) < 0) {
			if (errno != EINTR)
				return -1;
			/* poll is never restarted after a handler (signal(7)): a signal came. */
			c->signalled = 1;
			if (!c->interrupted)
				send_interrupt(c);
			continue;
		}
		struct msghdr m;
		memset(&m, 0, sizeof(m));
		m.msg_iov = iov;
		m.msg_iovlen = n;
		ssize_t got = recvmsg(c->a, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (got < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			if (errno == ECONNRESET)
				errno = ECONNABORTED;
			return -1;
		}
		if (got == 0) {
			errno = ECONNABORTED;
			return -1;
		}
		struct fuse_out_header *h = iov[0].iov_base;
		if ((size_t)got < sizeof(*h)) {
			errno = EIO;
			return -1;
		}
		if (h->unique == 0) {
			if (h->error == FUSE_NOTIFY_POLL)
				c->notified = 1;
			continue;
		}
		/* A reply longer than what the request can take fails it (copy_out_args). */
		if ((m.msg_flags & MSG_TRUNC) || h->len != (uint32_t)got) {
			errno = EIO;
			return -1;
		}
		if (h->error != 0) {
			errno = (h->error < 0 && h->error > -4096) ? -h->error : EIO;
			return -1;
		}
		return got;
	}
}

/* ---------------------------------------------------------------------------------------
 * Connections to cusedev's listening socket: one per open file, one per stat.
 */

static int connect_cusedev(int cloexec)
{
	int s = socket(AF_UNIX, SOCK_SEQPACKET | (cloexec ? SOCK_CLOEXEC : 0), 0);
	if (s < 0)
		return -1;
	int one = 1;
	setsockopt(s, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));
	for (;;) {
		if (connect(s, (struct sockaddr *)&g_addr, g_addr_len) == 0)
			return s;
		if (errno != EINTR)
			break;
	}
	REAL(close)(s);
	errno = ENOENT; /* no cusedev: as if the node were missing */
	return -1;
}

/* Receives the one reply of an OPEN or LOOKUP on its connection. */
static ssize_t conn_reply(int s, struct iovec *iov, int n)
{
	struct msghdr m;
	memset(&m, 0, sizeof(m));
	m.msg_iov = iov;
	m.msg_iovlen = n;
	ssize_t got;
	do
		got = recvmsg(s, &m, MSG_CMSG_CLOEXEC);
	while (got < 0 && errno == EINTR);
	struct fuse_out_header *h = iov[0].iov_base;
	if (got <= 0) {
		errno = ENOENT; /* cusedev went away: the node with it */
		return -1;
	}
	if ((size_t)got < sizeof(*h) || (m.msg_flags & MSG_TRUNC)) {
		errno = EIO;
		return -1;
	}
	if (h->error != 0) {
		errno = (h->error < 0 && h->error > -4096) ? -h->error : EIO;
		return -1;
	}
	return got;
}

static int device_open(const char *name, int flags)
{
	int saved = errno;
	if (flags & O_DIRECTORY) {
		errno = ENOTDIR;
		return -1;
	}
	if (ensure_table() != 0) {
		errno = ENOMEM;
		return -1;
	}
	int s = connect_cusedev(flags & O_CLOEXEC);
	if (s < 0)
		return -1;
	if (s >= g_size) {
		REAL(close)(s);
		errno = EMFILE;
		return -1;
	}
	uint32_t fflags = (uint32_t)(flags | OPEN_FORCED);
	/* What do_dentry_open keeps in f_flags (fs/open.c); O_CLOEXEC is the descriptor's. */
	uint32_t kept = fflags & ~(uint32_t)(O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | O_CLOEXEC);
	struct fuse_in_header h;
	struct fuse_open_in in = {.flags = fflags, .open_flags = 0};
	struct iovec iov[3] = {{&h, sizeof(h)}, {&in, sizeof(in)}, {(void *)name, strlen(name) + 1}};
	in_header(&h, FUSE_OPEN, 1, (uint32_t)iov_total(iov, 3));
	if (send_msg(s, iov, 3, -1) != 0) {
		REAL(close)(s);
		errno = ENOENT;
		return -1;
	}
	struct fuse_out_header oh;
	struct fuse_open_out out;
	struct iovec riov[2] = {{&oh, sizeof(oh)}, {&out, sizeof(out)}};
	if (conn_reply(s, riov, 2) < 0) {
		int e = errno;
		REAL(close)(s);
		errno = e;
		return -1;
	}
	/* The status flags F_SETFL can change live on the socket, so that F_GETFL, F_SETFL and
	 * FIONBIO act on the file shared by every descriptor of it, as they would on a real node.
	 * Only our own sends see O_NONBLOCK there, and they wait it out. */
	if (flags & (O_NONBLOCK | O_APPEND))
		REAL(fcntl)(s, F_SETFL, flags & (O_NONBLOCK | O_APPEND));
	/* The access mode goes with the socket too (SO_PRIORITY means nothing to AF_UNIX and any
	 * value up to 6 is unprivileged), so that a new image after exec can read it back. */
	int prio = flags & O_ACCMODE;
	setsockopt(s, SOL_SOCKET, SO_PRIORITY, &prio, sizeof(prio));
	if (slot_set(s, (uint32_t)(flags & O_ACCMODE), kept) != 0) {
		REAL(close)(s);
		errno = EMFILE;
		return -1;
	}
	errno = saved;
	return s;
}

#define OPEN_MODE(flags, mode)                                    \
	do {                                                      \
		if (__OPEN_NEEDS_MODE(flags)) {                   \
			va_list ap;                               \
			va_start(ap, flags);                      \
			mode = (mode_t)va_arg(ap, int);           \
			va_end(ap);                               \
		}                                                 \
	} while (0)

EXPORT int open(const char *path, int flags, ...)
{
	mode_t mode = 0;
	OPEN_MODE(flags, mode);
	const char *name = device_name(path);
	if (LIKELY(name == NULL) || (flags & O_PATH))
		return REAL(open)(path, flags, mode);
	return device_open(name, flags);
}

EXPORT int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;
	OPEN_MODE(flags, mode);
	const char *name = device_name(path);
	if (LIKELY(name == NULL) || (flags & O_PATH))
		return REAL(open64)(path, flags, mode);
	return device_open(name, flags | O_LARGEFILE);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;
	OPEN_MODE(flags, mode);
	const char *name = device_name(path);
	if (LIKELY(name == NULL) || (flags & O_PATH))
		return REAL(openat)(dirfd, path, flags, mode);
	return device_open(name, flags);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;
	OPEN_MODE(flags, mode);
	const char *name = device_name(path);
	if (LIKELY(name == NULL) || (flags & O_PATH))
		return REAL(openat64)(dirfd, path, flags, mode);
	return device_open(name, flags | O_LARGEFILE);
}

/* The _FORTIFY_SOURCE entries: the real ones abort on O_CREAT without a mode first. */
EXPORT int __open_2(const char *path, int flags)
{
	const char *name = device_name(path);
	if (LIKELY(name == NULL) || __OPEN_NEEDS_MODE(flags) || (flags & O_PATH))
		return REAL(__open_2)(path, flags);
	return device_open(name, flags);
}

EXPORT int __open64_2(const char *path, int flags)
{
	const char *name = device_name(path);
	if (LIKELY(name == NULL) || __OPEN_NEEDS_MODE(flags) || (flags & O_PATH))
		return REAL(__open64_2)(path, flags);
	return device_open(name, flags | O_LARGEFILE);
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
	const char *name = device_name(path);
	if (LIKELY(name == NULL) || __OPEN_NEEDS_MODE(flags) || (flags & O_PATH))
		return REAL(__openat_2)(dirfd, path, flags);
	return device_open(name, flags);
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
	const char *name = device_name(path);
	if (LIKELY(name == NULL) || __OPEN_NEEDS_MODE(flags) || (flags & O_PATH))
		return REAL(__openat64_2)(dirfd, path, flags);
	return device_open(name, flags | O_LARGEFILE);
}

/* creat(2) is open(O_CREAT | O_WRONLY | O_TRUNC): of an existing node, a write-only open. */
EXPORT int creat(const char *path, mode_t mode)
{
	const char *name = device_name(path);
	if (LIKELY(name == NULL))
		return REAL(creat)(path, mode);
	return device_open(name, O_CREAT | O_WRONLY | O_TRUNC);
}

EXPORT int creat64(const char *path, mode_t mode)
{
	const char *name = device_name(path);
	if (LIKELY(name == NULL))
		return REAL(creat64)(path, mode);
	return device_open(name, O_CREAT | O_WRONLY | O_TRUNC | O_LARGEFILE);
}

/* ---------------------------------------------------------------------------------------
 * READ and WRITE (cuse_read_iter, cuse_write_iter -> fuse_direct_io, fs/fuse/file.c 6.1).
 */

/* vfs_read/vfs_write's checks before the driver (fs/read_write.c, 6.1). */
static int rw_checks(const void *buf, size_t *count)
{
#ifdef TASK_SIZE_MAX
	if (*count > TASK_SIZE_MAX || (uintptr_t)buf > TASK_SIZE_MAX - *count) {
		errno = EFAULT; /* access_ok */
		return -1;
	}
#else
	(void)buf;
#endif
	if ((ssize_t)*count < 0) {
		errno = EINVAL; /* rw_verify_area */
		return -1;
	}
	if (*count > MAX_RW_COUNT)
		*count = MAX_RW_COUNT;
	return 0;
}

/* How much of buf[0..len) the caller may write: the kernel pins the pages of a direct read
 * before it sends the request (fuse_get_user_pages), so a bad buffer fails it, or cuts it,
 * before the device sees anything. Copying the range onto itself through
 * process_vm_readv checks both readable and writable pages without changing a byte. */
static size_t writable_prefix(void *buf, size_t len)
{
	struct iovec l = {buf, len}, r = {buf, len};
	ssize_t n = process_vm_readv(getpid(), &l, 1, &r, 1, 0);
	if (n < 0)
		return (errno == EFAULT) ? 0 : len; /* no process_vm_readv: let recvmsg tell */
	return (size_t)n;
}

static ssize_t device_read(int fd, struct slot *s, void *buf, size_t count)
{
	int saved = errno;
	uint32_t acc = slot_accmode(s);
	if (acc != O_RDONLY && acc != O_RDWR) {
		errno = EBADF; /* !(f_mode & FMODE_READ) */
		return -1;
	}
	if (rw_checks(buf, &count) != 0)
		return -1;
	uint32_t flags = file_flags(fd, s);
	size_t done = 0;
	while (done < count) {
		size_t piece = count - done;
		if (piece > CUSE_MAX_IO)
			piece = CUSE_MAX_IO;
		size_t ok = writable_prefix((char *)buf + done, piece);
		if (ok == 0) {
			if (done > 0)
				break;
			errno = EFAULT;
			return -1;
		}
		piece = ok;
		struct fuse_in_header h;
		struct fuse_read_in in;
		memset(&in, 0, sizeof(in));
		in.size = (uint32_t)piece;
		in.flags = flags;
		struct iovec iov[2] = {{&h, sizeof(h)}, {&in, sizeof(in)}};
		struct call c;
		if (call_start(&c, fd, FUSE_READ, iov, 2) != 0) {
			if (done > 0)
				break;
			return -1;
		}
		struct fuse_out_header oh;
		struct iovec riov[2] = {{&oh, sizeof(oh)}, {(char *)buf + done, piece}};
		ssize_t got = call_wait(&c, riov, 2);
		call_end(&c);
		if (got < 0) {
			if (done > 0)
				break;
			return -1;
		}
		size_t n = (size_t)got - sizeof(oh);
		done += n;
		if (n < piece)
			break; /* a short piece ends the read (fuse_direct_io) */
	}
	errno = saved;
	return (ssize_t)done;
}

static ssize_t device_write(int fd, struct slot *s, const void *buf, size_t count)
{
	int saved = errno;
	uint32_t acc = slot_accmode(s);
	if (acc != O_WRONLY && acc != O_RDWR) {
		errno = EBADF;
		return -1;
	}
	if (rw_checks(buf, &count) != 0)
		return -1;
	uint32_t flags = file_flags(fd, s);
	size_t done = 0;
	while (done < count) {
		size_t piece = count - done;
		if (piece > CUSE_MAX_IO)
			piece = CUSE_MAX_IO;
		struct fuse_in_header h;
		struct fuse_write_in in;
		memset(&in, 0, sizeof(in));
		in.size = (uint32_t)piece;
		in.flags = flags;
		/* The data goes from the caller's buffer: a bad one is sendmsg's EFAULT. */
		struct iovec iov[3] = {{&h, sizeof(h)}, {&in, sizeof(in)}, {(char *)buf + done, piece}};
		struct call c;
		if (call_start(&c, fd, FUSE_WRITE, iov, 3) != 0) {
			if (done > 0)
				break;
			return -1;
		}
		struct fuse_out_header oh;
		struct fuse_write_out out;
		struct iovec riov[2] = {{&oh, sizeof(oh)}, {&out, sizeof(out)}};
		ssize_t got = call_wait(&c, riov, 2);
		call_end(&c);
		if (got >= 0 && ((size_t)got < sizeof(oh) + sizeof(out) || out.size > piece)) {
			errno = EIO;
			got = -1;
		}
		if (got < 0) {
			if (done > 0)
				break;
			return -1;
		}
		done += out.size;
		if (out.size < piece)
			break;
	}
	errno = saved;
	return (ssize_t)done;
}

EXPORT ssize_t read(int fd, void *buf, size_t count)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(read)(fd, buf, count);
	return device_read(fd, s, buf, count);
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t count, size_t buflen)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL) || count > buflen)
		return REAL(__read_chk)(fd, buf, count, buflen); /* which aborts on an overflow */
	return device_read(fd, s, buf, count);
}

EXPORT ssize_t write(int fd, const void *buf, size_t count)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(write)(fd, buf, count);
	return device_write(fd, s, buf, count);
}

/* readv/writev of a device: the kernel builds one iov_iter and splits it the same way; here
 * each segment is a read or write of its own, stopping at the first short one, which gives
 * the same bytes in the same places for a device that answers every piece in full. */
EXPORT ssize_t readv(int fd, const struct iovec *iov, int n)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(readv)(fd, iov, n);
	if (n < 0 || n > IOV_MAX) {
		errno = EINVAL;
		return -1;
	}
	int saved = errno;
	size_t total = 0;
	for (int i = 0; i < n; i++) {
		if (iov[i].iov_len == 0)
			continue;
		ssize_t r = device_read(fd, s, iov[i].iov_base, iov[i].iov_len);
		if (r < 0) {
			if (total > 0)
				break;
			return -1;
		}
		total += (size_t)r;
		if ((size_t)r < iov[i].iov_len)
			break;
	}
	errno = saved;
	return (ssize_t)total;
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int n)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(writev)(fd, iov, n);
	if (n < 0 || n > IOV_MAX) {
		errno = EINVAL;
		return -1;
	}
	int saved = errno;
	size_t total = 0;
	for (int i = 0; i < n; i++) {
		if (iov[i].iov_len == 0)
			continue;
		ssize_t r = device_write(fd, s, iov[i].iov_base, iov[i].iov_len);
		if (r < 0) {
			if (total > 0)
				break;
			return -1;
		}
		total += (size_t)r;
		if ((size_t)r < iov[i].iov_len)
			break;
	}
	errno = saved;
	return (ssize_t)total;
}

/* pread/pwrite: a CUSE file keeps FMODE_PREAD/FMODE_PWRITE (cuse_open does not make it
 * nonseekable, fs/fuse/cuse.c 6.1), so they reach the device like read/write, and CUSE
 * sends offset 0 whatever the caller named (cuse_read_iter's local pos). Debian's daemons
 * pread and pwrite their device. A negative offset is EINVAL before anything else
 * (ksys_pread64/ksys_pwrite64, fs/read_write.c 6.1). */
static ssize_t device_pread(int fd, struct slot *s, void *buf, size_t count, int64_t pos)
{
	if (pos < 0) {
		errno = EINVAL;
		return -1;
	}
	return device_read(fd, s, buf, count);
}

static ssize_t device_pwrite(int fd, struct slot *s, const void *buf, size_t count, int64_t pos)
{
	if (pos < 0) {
		errno = EINVAL;
		return -1;
	}
	return device_write(fd, s, buf, count);
}

EXPORT ssize_t pread(int fd, void *buf, size_t count, off_t pos)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(pread)(fd, buf, count, pos);
	return device_pread(fd, s, buf, count, pos);
}

EXPORT ssize_t pread64(int fd, void *buf, size_t count, off64_t pos)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(pread64)(fd, buf, count, pos);
	return device_pread(fd, s, buf, count, pos);
}

EXPORT ssize_t __pread_chk(int fd, void *buf, size_t count, off_t pos, size_t buflen)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL) || count > buflen)
		return REAL(__pread_chk)(fd, buf, count, pos, buflen); /* which aborts on an overflow */
	return device_pread(fd, s, buf, count, pos);
}

EXPORT ssize_t __pread64_chk(int fd, void *buf, size_t count, off64_t pos, size_t buflen)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL) || count > buflen)
		return REAL(__pread64_chk)(fd, buf, count, pos, buflen);
	return device_pread(fd, s, buf, count, pos);
}

EXPORT ssize_t pwrite(int fd, const void *buf, size_t count, off_t pos)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(pwrite)(fd, buf, count, pos);
	return device_pwrite(fd, s, buf, count, pos);
}

EXPORT ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t pos)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(pwrite64)(fd, buf, count, pos);
	return device_pwrite(fd, s, buf, count, pos);
}

/* ---------------------------------------------------------------------------------------
 * IOCTL: the retry loop of fuse_do_ioctl (fs/fuse/ioctl.c, 6.1), run in the caller.
 */

#define IOCTL_BUF (CUSE_MAX_PAGES * PAGE)

static int verify_iov(const struct fuse_ioctl_iovec *iov, uint32_t n)
{
	/* fuse_verify_ioctl_iov: each direction within max_pages, checked so it cannot wrap. */
	uint64_t max = (uint64_t)CUSE_MAX_PAGES * PAGE;
	for (uint32_t i = 0; i < n; i++) {
		if (iov[i].len > max)
			return -1;
		max -= iov[i].len;
	}
	return 0;
}

static int to_local_iov(struct iovec *dst, const struct fuse_ioctl_iovec *src, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		/* fuse_copy_ioctl_iovec: a value that does not fit the caller's pointers is EIO. */
		if (src[i].base != (uintptr_t)src[i].base || src[i].len != (size_t)src[i].len)
			return -1;
		dst[i].iov_base = (void *)(uintptr_t)src[i].base;
		dst[i].iov_len = (size_t)src[i].len;
	}
	return 0;
}

static int device_ioctl(int fd, unsigned int cmd, unsigned long arg)
{
	int saved = errno;
	/* Room for the input, and for the output or an iovec list (at least a page, as
	 * fuse_do_ioctl makes sure): mapped, as a signal handler's stack may be small. */
	size_t bytes = 2 * (size_t)IOCTL_BUF;
	char *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		errno = ENOMEM;
		return -1;
	}
	char *inbuf = mem, *outbuf = mem + IOCTL_BUF;
	struct fuse_ioctl_iovec fiov[FUSE_IOCTL_MAX_IOV];
	struct iovec in_iov[FUSE_IOCTL_MAX_IOV], out_iov[FUSE_IOCTL_MAX_IOV];
	uint32_t in_iovs = 0, out_iovs = 0;
	struct call c;
	int started = 0, result = -1, err = 0;
	pid_t self = getpid();
	for (;;) {
		size_t in_size = 0, out_size = 0;
		for (uint32_t i = 0; i < in_iovs; i++)
			in_size += in_iov[i].iov_len;
		for (uint32_t i = 0; i < out_iovs; i++)
			out_size += out_iov[i].iov_len;
		if (in_size > IOCTL_BUF || out_size > IOCTL_BUF) {
			err = ENOMEM;
			break;
		}
		if (in_size > 0) {
			/* The kernel copies the input in before it sends (copy_page_from_iter). */
			struct iovec l = {inbuf, in_size};
			if (process_vm_readv(self, &l, 1, in_iov, in_iovs, 0) != (ssize_t)in_size) {
				err = EFAULT;
				break;
			}
		}
		struct fuse_in_header h;
		struct fuse_ioctl_in in;
		memset(&in, 0, sizeof(in));
		in.flags = IOCTL_FLAGS;
		in.cmd = cmd;
		in.arg = (uint64_t)arg;
		in.in_size = (uint32_t)in_size;
		in.out_size = (uint32_t)out_size;
		struct iovec iov[3] = {{&h, sizeof(h)}, {&in, sizeof(in)}, {inbuf, in_size}};
		int niov = in_size > 0 ? 3 : 2;
		int r;
		if (!started) {
			r = call_start(&c, fd, FUSE_IOCTL, iov, niov);
			started = r == 0;
		} else {
			r = call_again(&c, FUSE_IOCTL, iov, niov);
		}
		if (r != 0) {
			err = errno;
			break;
		}
		struct fuse_out_header oh;
		struct fuse_ioctl_out out;
		size_t room = out_size > PAGE ? out_size : PAGE;
		struct iovec riov[3] = {{&oh, sizeof(oh)}, {&out, sizeof(out)}, {outbuf, room}};
		ssize_t got = call_wait(&c, riov, 3);
		if (got < 0) {
			/* fuse_send_ioctl: ENOSYS, which a driver should not give, reads as ENOTTY. */
			err = errno == ENOSYS ? ENOTTY : errno;
			break;
		}
		if ((size_t)got < sizeof(oh) + sizeof(out)) {
			err = EIO;
			break;
		}
		size_t transferred = (size_t)got - sizeof(oh) - sizeof(out);
		if (out.flags & FUSE_IOCTL_RETRY) {
			in_iovs = out.in_iovs;
			out_iovs = out.out_iovs;
			if (in_iovs > FUSE_IOCTL_MAX_IOV || out_iovs > FUSE_IOCTL_MAX_IOV ||
			    in_iovs + out_iovs > FUSE_IOCTL_MAX_IOV) {
				err = ENOMEM;
				break;
			}
			if (transferred != (in_iovs + out_iovs) * sizeof(struct fuse_ioctl_iovec)) {
				err = EIO;
				break;
			}
			memcpy(fiov, outbuf, transferred);
			if (to_local_iov(in_iov, fiov, in_iovs) != 0 ||
			    to_local_iov(out_iov, fiov + in_iovs, out_iovs) != 0) {
				err = EIO;
				break;
			}
			if (verify_iov(fiov, in_iovs) != 0 || verify_iov(fiov + in_iovs, out_iovs) != 0) {
				err = ENOMEM;
				break;
			}
			continue;
		}
		if (transferred > out_size) {
			err = EIO;
			break;
		}
		if (transferred > 0) {
			/* ... and the output out after the last reply (copy_page_to_iter). */
			struct iovec l = {outbuf, transferred};
			if (process_vm_writev(self, &l, 1, out_iov, out_iovs, 0) != (ssize_t)transferred) {
				err = EFAULT;
				break;
			}
		}
		result = out.result;
		break;
	}
	if (started)
		call_end(&c);
	munmap(mem, bytes);
	if (err != 0) {
		errno = err;
		return -1;
	}
	if (result < 0) {
		/* A driver's negative result is the syscall's error. */
		errno = -result;
		return -1;
	}
	errno = saved;
	return result;
}

EXPORT int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	va_start(ap, request);
	unsigned long arg = va_arg(ap, unsigned long);
	va_end(ap);
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(ioctl)(fd, request, arg);
	unsigned int cmd = (unsigned int)request;
	switch (cmd) {
	/* do_vfs_ioctl (fs/ioctl.c, 6.1) answers these itself, on the file: the socket. */
	case FIOCLEX:
	case FIONCLEX:
	case FIONBIO:
	case FIOASYNC:
		return REAL(ioctl)(fd, request, arg);
	case FIOQSIZE: /* only for directories, regular files and links */
		errno = ENOTTY;
		return -1;
	default:
		return device_ioctl(fd, cmd, arg);
	}
}

/* ---------------------------------------------------------------------------------------
 * The poll family: the loop of do_poll (fs/select.c, 6.1), with a device's readiness asked
 * by a POLL call whose socket stays open to bring FUSE_NOTIFY_POLL.
 */

struct dev_wait {
	int fd;
	uint32_t key;  /* the events asked (poll_requested_events) */
	uint32_t mask; /* the device's answer */
	int a;         /* the call socket kept for the notification, or -1 */
	int stale;     /* to be asked (again) */
};

static void dev_ask(struct dev_wait *d, int notify, int *signalled)
{
	if (d->a >= 0) {
		REAL(close)(d->a); /* drops the old registration */
		d->a = -1;
	}
	d->stale = 0;
	struct fuse_in_header h;
	struct fuse_poll_in in;
	memset(&in, 0, sizeof(in));
	in.flags = notify ? FUSE_POLL_SCHEDULE_NOTIFY : 0;
	in.events = d->key & POLL_BITS;
	struct iovec iov[2] = {{&h, sizeof(h)}, {&in, sizeof(in)}};
	struct call c;
	if (call_start(&c, d->fd, FUSE_POLL, iov, 2) != 0) {
		d->mask = POLLERR;
		return;
	}
	struct fuse_out_header oh;
	struct fuse_poll_out out;
	struct iovec riov[2] = {{&oh, sizeof(oh)}, {&out, sizeof(out)}};
	ssize_t got = call_wait(&c, riov, 2);
	if (c.signalled)
		*signalled = 1;
	if (got < 0 || (size_t)got < sizeof(oh) + sizeof(out)) {
		/* fuse_file_poll: no poll method (ENOSYS) is DEFAULT_POLLMASK, any failure EPOLLERR */
		d->mask = (got < 0 && errno == ENOSYS) ? DEFAULT_POLLMASK : POLLERR;
		call_end(&c);
		return;
	}
	d->mask = out.revents;
	if (notify) {
		d->a = c.a;
		if (c.notified)
			d->stale = 1; /* the wakeup came along with the answer */
	} else {
		call_end(&c);
	}
}

static void drain_notify(int a)
{
	char buf[64];
	while (recv(a, buf, sizeof(buf), MSG_DONTWAIT) > 0)
		;
}

static int64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Waits until a device or one of `k[0..nk)` is ready, `timeout` (NULL: forever) passes or a
 * signal arrives. `k` must have room for nk + nd entries (the notification sockets join the
 * real wait). Fills d[].mask and k[].revents; returns how many entries are ready, 0 on
 * timeout, or -1 (EINTR, or an error of the real poll). */
static int wait_loop(struct dev_wait *d, int nd, struct pollfd *k, int nk,
		     const struct timespec *timeout, const sigset_t *sigmask)
{
	int saved = errno;
	int64_t deadline = 0;
	int forever = timeout == NULL;
	int zero = !forever && timeout->tv_sec == 0 && timeout->tv_nsec == 0;
	if (!forever)
		deadline = now_ns() + (int64_t)timeout->tv_sec * 1000000000 + timeout->tv_nsec;
	for (int i = 0; i < nd; i++) {
		d[i].a = -1;
		d[i].stale = 1;
		d[i].mask = 0;
	}
	int count, signalled = 0;
	for (;;) {
		count = 0;
		int restale = 0;
		for (int i = 0; i < nd; i++) {
			if (d[i].stale)
				/* Registration while the wait may still block, as do_poll drops its
				 * poll table once something is ready or the timeout is zero. */
				dev_ask(&d[i], !zero && count == 0, &signalled);
			if (d[i].mask & d[i].key)
				count++;
			restale |= d[i].stale;
		}
		int nw = nk;
		for (int i = 0; i < nd; i++) {
			if (d[i].a >= 0) {
				k[nw].fd = d[i].a;
				k[nw].events = POLLIN;
				nw++;
			}
		}
		for (int i = 0; i < nw; i++)
			k[i].revents = 0;
		struct timespec left = {0, 0};
		int expired = 0;
		if (!forever && !count && !restale) {
			int64_t ns = deadline - now_ns();
			if (ns <= 0) {
				ns = 0;
				expired = 1;
			}
			left.tv_sec = (time_t)(ns / 1000000000);
			left.tv_nsec = (long)(ns % 1000000000);
		}
		const struct timespec *t = (forever && !count && !restale) ? NULL : &left;
		int r = REAL(ppoll)(k, (nfds_t)nw, t, sigmask);
		if (r < 0) {
			if (errno != EINTR || count == 0) {
				int e = errno;
				for (int i = 0; i < nd; i++)
					if (d[i].a >= 0)
						REAL(close)(d[i].a);
				errno = e;
				return -1;
			}
			for (int i = 0; i < nw; i++)
				k[i].revents = 0;
			r = 0;
		}
		for (int i = 0; i < nk; i++)
			if (k[i].revents)
				count++;
		for (int i = nk, j = 0; i < nw; i++, j++) {
			while (d[j].a != k[i].fd)
				j++;
			if (k[i].revents) {
				drain_notify(d[j].a);
				d[j].stale = 1;
			}
		}
		if (count > 0)
			break;
		if (signalled) {
			count = -1;
			errno = EINTR;
			break;
		}
		if (zero || expired || (!forever && r == 0 && now_ns() >= deadline))
			break;
	}
	int e = errno;
	for (int i = 0; i < nd; i++)
		if (d[i].a >= 0)
			REAL(close)(d[i].a);
	errno = count < 0 ? e : saved;
	return count;
}

/* Scratch for a wait: on the stack when small, else mapped. */
struct scratch {
	void *mem;
	size_t bytes;
	char small[4096];
};

static void *scratch_get(struct scratch *s, size_t bytes)
{
	s->bytes = 0;
	if (bytes <= sizeof(s->small))
		return s->small;
	void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return NULL;
	s->mem = m;
	s->bytes = bytes;
	return m;
}

static void scratch_put(struct scratch *s)
{
	if (s->bytes)
		munmap(s->mem, s->bytes);
}

static int nfds_limit(void)
{
	struct rlimit lim;
	if (getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur > INT_MAX)
		return INT_MAX;
	return (int)lim.rlim_cur;
}

/* poll and ppoll with at least one device among fds. */
static int device_poll(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
		       const sigset_t *sigmask)
{
	if (n > (nfds_t)nfds_limit()) {
		errno = EINVAL;
		return -1;
	}
	struct scratch sc;
	size_t bytes = n * (sizeof(struct dev_wait) + 2 * sizeof(struct pollfd) + sizeof(int));
	char *mem = scratch_get(&sc, bytes);
	if (mem == NULL) {
		errno = ENOMEM;
		return -1;
	}
	struct dev_wait *d = (struct dev_wait *)mem;
	struct pollfd *k = (struct pollfd *)(d + n);
	int *where = (int *)(k + 2 * n); /* fds[i] is d[where[i]] (>= 0) or k[-1 - where[i]] */
	int nd = 0, nk = 0;
	for (nfds_t i = 0; i < n; i++) {
		if (fds[i].fd >= 0 && device_slot(fds[i].fd) != NULL) {
			d[nd].fd = fds[i].fd;
			d[nd].key = (uint32_t)(uint16_t)fds[i].events | POLLERR | POLLHUP;
			where[i] = nd++;
		} else {
			k[nk] = fds[i];
			where[i] = -1 - nk++;
		}
	}
	int r = wait_loop(d, nd, k, nk, timeout, sigmask);
	if (r >= 0) {
		r = 0;
		for (nfds_t i = 0; i < n; i++) {
			if (where[i] >= 0)
				fds[i].revents = (short)(d[where[i]].mask & d[where[i]].key);
			else
				fds[i].revents = k[-1 - where[i]].revents;
			if (fds[i].revents)
				r++;
		}
	}
	int e = errno;
	scratch_put(&sc);
	errno = e;
	return r;
}

static int any_device(const struct pollfd *fds, nfds_t n)
{
	if (LIKELY(__atomic_load_n(&g_table, __ATOMIC_RELAXED) == NULL))
		return 0;
	for (nfds_t i = 0; i < n; i++)
		if (fds[i].fd >= 0 && device_slot(fds[i].fd) != NULL)
			return 1;
	return 0;
}

static struct timespec ms_timeout(int ms)
{
	struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000};
	return t;
}

/* glibc declares poll's array write-only (access attribute); it is read too, as poll(2) says. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
	if (LIKELY(!any_device(fds, n)))
		return REAL(poll)(fds, n, timeout);
	struct timespec t = ms_timeout(timeout);
	return device_poll(fds, n, timeout < 0 ? NULL : &t, NULL);
}

EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t len)
{
	if (LIKELY(!any_device(fds, n)) || len / sizeof(*fds) < n)
		return REAL(__poll_chk)(fds, n, timeout, len); /* which aborts on an overflow */
	struct timespec t = ms_timeout(timeout);
	return device_poll(fds, n, timeout < 0 ? NULL : &t, NULL);
}

static int timespec_bad(const struct timespec *t)
{
	return t != NULL && (t->tv_sec < 0 || t->tv_nsec < 0 || t->tv_nsec >= 1000000000);
}

EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *t, const sigset_t *mask)
{
	if (LIKELY(!any_device(fds, n)))
		return REAL(ppoll)(fds, n, t, mask);
	if (timespec_bad(t)) {
		errno = EINVAL;
		return -1;
	}
	return device_poll(fds, n, t, mask);
}

EXPORT int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *t,
		       const sigset_t *mask, size_t len)
{
	if (LIKELY(!any_device(fds, n)) || len / sizeof(*fds) < n)
		return REAL(__ppoll_chk)(fds, n, t, mask, len);
	if (timespec_bad(t)) {
		errno = EINVAL;
		return -1;
	}
	return device_poll(fds, n, t, mask);
}
#pragma GCC diagnostic pop

/* select and pselect: fd_sets read as the kernel reads them (arrays of longs), so sets
 * larger than FD_SETSIZE work too. */
#define LBITS (8 * sizeof(unsigned long))
static int bit_get(const fd_set *s, int fd)
{
	return s != NULL && ((((const unsigned long *)s)[fd / LBITS] >> (fd % LBITS)) & 1);
}
static void bit_set(fd_set *s, int fd)
{
	((unsigned long *)s)[fd / LBITS] |= 1ul << (fd % LBITS);
}
static void bit_clear(fd_set *s, int fd)
{
	((unsigned long *)s)[fd / LBITS] &= ~(1ul << (fd % LBITS));
}

static int sets_have_device(int n, fd_set *r, fd_set *w, fd_set *e)
{
	if (LIKELY(__atomic_load_n(&g_table, __ATOMIC_RELAXED) == NULL))
		return 0;
	for (int fd = 0; fd < n; fd++)
		if ((bit_get(r, fd) || bit_get(w, fd) || bit_get(e, fd)) && device_slot(fd) != NULL)
			return 1;
	return 0;
}

static int device_select(int n, fd_set *rs, fd_set *ws, fd_set *es, const struct timespec *timeout,
			 const sigset_t *sigmask)
{
	int limit = nfds_limit();
	if (n > limit)
		n = limit; /* core_sys_select: n is cut to max_fds */
	int count = 0;
	for (int fd = 0; fd < n; fd++)
		if (bit_get(rs, fd) || bit_get(ws, fd) || bit_get(es, fd))
			count++;
	struct scratch sc;
	size_t bytes = (size_t)count * (sizeof(struct dev_wait) + 2 * sizeof(struct pollfd) + sizeof(int));
	char *mem = scratch_get(&sc, bytes);
	if (mem == NULL) {
		errno = ENOMEM;
		return -1;
	}
	struct dev_wait *d = (struct dev_wait *)mem;
	struct pollfd *k = (struct pollfd *)(d + count);
	int *fdof = (int *)(k + 2 * count);
	int nd = 0, nk = 0, m = 0;
	for (int fd = 0; fd < n; fd++) {
		int in = bit_get(rs, fd), out = bit_get(ws, fd), ex = bit_get(es, fd);
		if (!(in || out || ex))
			continue;
		uint32_t key = POLLEX_SET | (in ? POLLIN_SET : 0) | (out ? POLLOUT_SET : 0);
		fdof[m++] = fd;
		if (device_slot(fd) != NULL) {
			d[nd].fd = fd;
			d[nd].key = key;
			nd++;
		} else {
			/* max_select_fd: a set naming a closed descriptor is EBADF, sets untouched. */
			if (REAL(fcntl)(fd, F_GETFD) < 0) {
				scratch_put(&sc);
				errno = EBADF;
				return -1;
			}
			k[nk].fd = fd;
			k[nk].events = (short)key;
			nk++;
		}
	}
	int64_t deadline = timeout ? now_ns() + (int64_t)timeout->tv_sec * 1000000000 + timeout->tv_nsec : 0;
	int bits;
	for (;;) {
		struct timespec left, *t = NULL;
		if (timeout) {
			int64_t ns = deadline - now_ns();
			if (ns < 0)
				ns = 0;
			left.tv_sec = (time_t)(ns / 1000000000);
			left.tv_nsec = (long)(ns % 1000000000);
			t = &left;
		}
		int r = wait_loop(d, nd, k, nk, t, sigmask);
		if (r < 0) {
			int e = errno;
			scratch_put(&sc);
			errno = e;
			return -1;
		}
		/* Count what select counts: bits, not descriptors. A descriptor ready only in a way
		 * no set asked for (POLLHUP for a write set) does not end the wait. */
		bits = 0;
		for (int i = 0, di = 0, ki = 0; i < m; i++) {
			int fd = fdof[i];
			uint32_t mask;
			if (di < nd && d[di].fd == fd)
				mask = d[di++].mask;
			else
				mask = (uint16_t)k[ki++].revents;
			bits += (bit_get(rs, fd) && (mask & POLLIN_SET)) + (bit_get(ws, fd) && (mask & POLLOUT_SET)) +
				(bit_get(es, fd) && (mask & POLLEX_SET));
		}
		if (bits > 0 || r == 0)
			break;
	}
	/* Write the sets back: only the ready bits stay. Entries go up by descriptor, and each
	 * touches only its own bit, so every bit is read before it is rewritten. */
	for (int i = 0, di = 0, ki = 0; i < m; i++) {
		int fd = fdof[i];
		uint32_t mask;
		if (di < nd && d[di].fd == fd)
			mask = d[di++].mask;
		else
			mask = (uint16_t)k[ki++].revents;
		fd_set *sets[3] = {rs, ws, es};
		const uint32_t want[3] = {POLLIN_SET, POLLOUT_SET, POLLEX_SET};
		for (int j = 0; j < 3; j++) {
			if (!bit_get(sets[j], fd))
				continue;
			bit_clear(sets[j], fd);
			if (mask & want[j])
				bit_set(sets[j], fd);
		}
	}
	scratch_put(&sc);
	return bits;
}

EXPORT int select(int n, fd_set *rs, fd_set *ws, fd_set *es, struct timeval *tv)
{
	if (LIKELY(n <= 0 || !sets_have_device(n, rs, ws, es)))
		return REAL(select)(n, rs, ws, es, tv);
	struct timespec t, *tp = NULL;
	if (tv != NULL) {
		if (tv->tv_sec < 0 || tv->tv_usec < 0) {
			errno = EINVAL;
			return -1;
		}
		t.tv_sec = tv->tv_sec + tv->tv_usec / 1000000;
		t.tv_nsec = (long)(tv->tv_usec % 1000000) * 1000;
		tp = &t;
	}
	int64_t start = now_ns();
	int r = device_select(n, rs, ws, es, tp, NULL);
	if (tv != NULL) {
		/* Linux's select(2) writes back the time not slept (poll_select_finish). */
		int64_t left = (int64_t)t.tv_sec * 1000000000 + t.tv_nsec - (now_ns() - start);
		if (left < 0)
			left = 0;
		tv->tv_sec = (time_t)(left / 1000000000);
		tv->tv_usec = (suseconds_t)((left % 1000000000) / 1000);
	}
	return r;
}

EXPORT int pselect(int n, fd_set *rs, fd_set *ws, fd_set *es, const struct timespec *t,
		   const sigset_t *mask)
{
	if (LIKELY(n <= 0 || !sets_have_device(n, rs, ws, es)))
		return REAL(pselect)(n, rs, ws, es, t, mask);
	if (timespec_bad(t)) {
		errno = EINVAL;
		return -1;
	}
	return device_select(n, rs, ws, es, t, mask);
}

/* ---------------------------------------------------------------------------------------
 * epoll: a device in an epoll set is kept here (the kernel cannot poll it), and a wait on a
 * set that holds one runs the loop above with the epoll descriptor itself among the fds.
 */

#define MAX_EPOLL_DEVICES 256
struct ep_reg {
	int used;
	int epfd;
	int fd;
	uint32_t events;
	epoll_data_t data;
	uint64_t ino, dev; /* the device socket when it was added */
};
static struct ep_reg g_ep[MAX_EPOLL_DEVICES];
static int g_nep;     /* registrations in use */
static int g_ep_lock; /* a spinlock: short sections, released around fork (pthread_atfork) */

static void ep_lock(void)
{
	while (__atomic_exchange_n(&g_ep_lock, 1, __ATOMIC_ACQUIRE))
		sched_yield();
}
static void ep_unlock(void)
{
	__atomic_store_n(&g_ep_lock, 0, __ATOMIC_RELEASE);
}

static struct ep_reg *ep_find(int epfd, int fd)
{
	for (int i = 0; i < MAX_EPOLL_DEVICES; i++)
		if (g_ep[i].used && g_ep[i].epfd == epfd && g_ep[i].fd == fd)
			return &g_ep[i];
	return NULL;
}

/* The bits of an epoll mask that are flags, not events (EP_PRIVATE_BITS, fs/eventpoll.c). */
#define EP_FLAGS (EPOLLWAKEUP | EPOLLONESHOT | EPOLLET | EPOLLEXCLUSIVE)

EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return REAL(epoll_ctl)(epfd, op, fd, ev);
	int saved = errno;
	/* Is epfd an epoll set? Ask it to delete the device socket, which it never holds: an
	 * epoll set says ENOENT, anything else EINVAL or EBADF, as the real call would. */
	if (REAL(epoll_ctl)(epfd, EPOLL_CTL_DEL, fd, NULL) != 0 && errno != ENOENT)
		return -1;
	if (epfd == fd) {
		errno = EINVAL;
		return -1;
	}
	if ((op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD) && ev == NULL) {
		errno = EFAULT;
		return -1;
	}
	int err = 0;
	ep_lock();
	struct ep_reg *r = ep_find(epfd, fd);
	switch (op) {
	case EPOLL_CTL_ADD:
		if (r != NULL) {
			err = EEXIST;
			break;
		}
		for (int i = 0; i < MAX_EPOLL_DEVICES && r == NULL; i++)
			if (!g_ep[i].used)
				r = &g_ep[i];
		if (r == NULL) {
			err = ENOSPC; /* as max_user_watches */
			break;
		}
		r->used = 1;
		r->epfd = epfd;
		r->fd = fd;
		r->events = ev->events | EPOLLERR | EPOLLHUP;
		r->data = ev->data;
		r->ino = s->ino;
		r->dev = s->dev;
		__atomic_add_fetch(&g_nep, 1, __ATOMIC_RELEASE);
		break;
	case EPOLL_CTL_MOD:
		if (r == NULL) {
			err = ENOENT;
		} else if (ev->events & EPOLLEXCLUSIVE) {
			err = EINVAL;
		} else {
			r->events = ev->events | EPOLLERR | EPOLLHUP;
			r->data = ev->data;
		}
		break;
	case EPOLL_CTL_DEL:
		if (r == NULL) {
			err = ENOENT;
		} else {
			r->used = 0;
			__atomic_sub_fetch(&g_nep, 1, __ATOMIC_RELEASE);
		}
		break;
	default:
		err = EINVAL;
	}
	ep_unlock();
	if (err) {
		errno = err;
		return -1;
	}
	errno = saved;
	return 0;
}

/* epoll_wait and kin on a set holding devices; NULL when it holds none (pass through). */
static int device_epoll_wait(int epfd, struct epoll_event *events, int max,
			     const struct timespec *timeout, const sigset_t *sigmask, int *handled)
{
	struct dev_wait d[MAX_EPOLL_DEVICES];
	struct ep_reg regs[MAX_EPOLL_DEVICES];
	int nd = 0;
	*handled = 0;
	ep_lock();
	for (int i = 0; i < MAX_EPOLL_DEVICES; i++)
		if (g_ep[i].used && g_ep[i].epfd == epfd)
			regs[nd++] = g_ep[i];
	ep_unlock();
	if (nd == 0)
		return 0;
	*handled = 1;
	if (max <= 0 || max > INT_MAX / (int)sizeof(struct epoll_event)) {
		errno = EINVAL;
		return -1;
	}
	/* Devices gone from this process, or disabled by EPOLLONESHOT, are not asked. */
	int n = 0;
	for (int i = 0; i < nd; i++) {
		struct slot *s = device_slot(regs[i].fd);
		if (s == NULL || s->ino != regs[i].ino || s->dev != regs[i].dev ||
		    (regs[i].events & ~(uint32_t)EP_FLAGS & ~(uint32_t)(EPOLLERR | EPOLLHUP)) == 0)
			continue;
		regs[n] = regs[i];
		d[n].fd = regs[i].fd;
		d[n].key = regs[i].events & ~(uint32_t)EP_FLAGS;
		n++;
	}
	int64_t deadline = timeout ? now_ns() + (int64_t)timeout->tv_sec * 1000000000 + timeout->tv_nsec : 0;
	for (;;) {
		struct pollfd k[1 + MAX_EPOLL_DEVICES];
		k[0].fd = epfd;
		k[0].events = POLLIN;
		struct timespec left, *t = NULL;
		if (timeout) {
			int64_t ns = deadline - now_ns();
			if (ns < 0)
				ns = 0;
			left.tv_sec = (time_t)(ns / 1000000000);
			left.tv_nsec = (long)(ns % 1000000000);
			t = &left;
		}
		int r = wait_loop(d, n, k, 1, t, sigmask);
		if (r < 0)
			return -1;
		int out = 0;
		for (int i = 0; i < n && out < max; i++) {
			uint32_t m = d[i].mask & d[i].key;
			if (!m)
				continue;
			events[out].events = m;
			events[out].data = regs[i].data;
			out++;
			if (regs[i].events & EPOLLONESHOT) {
				/* Disabled until the next EPOLL_CTL_MOD (ep_send_events). */
				ep_lock();
				struct ep_reg *g = ep_find(epfd, regs[i].fd);
				if (g != NULL)
					g->events &= EP_FLAGS;
				ep_unlock();
			}
		}
		if (out < max && (k[0].revents & POLLIN)) {
			int saved = errno;
			int got = REAL(epoll_wait)(epfd, events + out, max - out, 0);
			if (got > 0)
				out += got;
			errno = saved;
		}
		if (out > 0 || r == 0)
			return out;
		/* The set woke with nothing to give after all (another waiter took it): go on. */
	}
}

EXPORT int epoll_wait(int epfd, struct epoll_event *events, int max, int timeout)
{
	if (LIKELY(__atomic_load_n(&g_nep, __ATOMIC_ACQUIRE) == 0))
		return REAL(epoll_wait)(epfd, events, max, timeout);
	struct timespec t = ms_timeout(timeout);
	int handled, r = device_epoll_wait(epfd, events, max, timeout < 0 ? NULL : &t, NULL, &handled);
	return handled ? r : REAL(epoll_wait)(epfd, events, max, timeout);
}

EXPORT int epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout,
		       const sigset_t *mask)
{
	if (LIKELY(__atomic_load_n(&g_nep, __ATOMIC_ACQUIRE) == 0))
		return REAL(epoll_pwait)(epfd, events, max, timeout, mask);
	struct timespec t = ms_timeout(timeout);
	int handled, r = device_epoll_wait(epfd, events, max, timeout < 0 ? NULL : &t, mask, &handled);
	return handled ? r : REAL(epoll_pwait)(epfd, events, max, timeout, mask);
}

EXPORT int epoll_pwait2(int epfd, struct epoll_event *events, int max, const struct timespec *t,
			const sigset_t *mask)
{
	if (LIKELY(__atomic_load_n(&g_nep, __ATOMIC_ACQUIRE) == 0))
		return REAL(epoll_pwait2)(epfd, events, max, t, mask);
	if (timespec_bad(t)) {
		errno = EINVAL;
		return -1;
	}
	int handled, r = device_epoll_wait(epfd, events, max, t, mask, &handled);
	return handled ? r : REAL(epoll_pwait2)(epfd, events, max, t, mask);
}

/* ---------------------------------------------------------------------------------------
 * Descriptors: close, dup, fcntl.
 */

EXPORT int close(int fd)
{
	/* A device slot stays (see the top comment); an epoll set's registrations go with it. */
	if (UNLIKELY(__atomic_load_n(&g_nep, __ATOMIC_ACQUIRE) != 0)) {
		ep_lock();
		for (int i = 0; i < MAX_EPOLL_DEVICES; i++) {
			if (g_ep[i].used && g_ep[i].epfd == fd) {
				g_ep[i].used = 0;
				__atomic_sub_fetch(&g_nep, 1, __ATOMIC_RELEASE);
			}
		}
		ep_unlock();
	}
	return REAL(close)(fd);
}

/* A new descriptor for the same file: it is a device descriptor too. */
static int dup_result(int from, struct slot *s, int to)
{
	if (to >= 0 && s != NULL) {
		if ((unsigned)to >= (unsigned)g_size) {
			REAL(close)(to);
			errno = EMFILE;
			return -1;
		}
		slot_copy(from, s, to);
	}
	return to;
}

EXPORT int dup(int fd)
{
	struct slot *s = device_slot(fd);
	return dup_result(fd, s, REAL(dup)(fd));
}

EXPORT int dup2(int fd, int to)
{
	struct slot *s = device_slot(fd);
	return dup_result(fd, s, REAL(dup2)(fd, to));
}

EXPORT int dup3(int fd, int to, int flags)
{
	struct slot *s = device_slot(fd);
	return dup_result(fd, s, REAL(dup3)(fd, to, flags));
}

static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, void *arg)
{
	struct slot *s = device_slot(fd);
	if (LIKELY(s == NULL))
		return real(fd, cmd, arg);
	if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
		return dup_result(fd, s, real(fd, cmd, arg));
	if (cmd == F_GETFL) {
		int r = real(fd, cmd);
		if (r < 0)
			return r;
		/* The socket is O_RDWR whatever the open asked; the file is what the open made. */
		return (int)file_flags(fd, s);
	}
	return real(fd, cmd, arg);
}

/* The third argument is an int or a pointer; read as a pointer it carries either (glibc's own
 * fcntl does the same). */
EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	return fcntl_common(REAL(fcntl), fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	va_start(ap, cmd);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	return fcntl_common(REAL(fcntl64), fd, cmd, arg);
}

/* clone(CLONE_VM) without CLONE_FILES: from now on the table is shared by processes with
 * descriptor tables of their own (the lguest Launcher's service processes). */
REAL_DECL(int, clone, (int (*)(void *), void *, int, void *, ...));
EXPORT int clone(int (*fn)(void *), void *stack, int flags, void *arg, ...)
{
	va_list ap;
	va_start(ap, arg);
	/* Whether or not the caller passed them: clone reads them only when flags say so. */
	void *ptid = va_arg(ap, void *);
	void *tls = va_arg(ap, void *);
	void *ctid = va_arg(ap, void *);
	va_end(ap);
	if ((flags & CLONE_VM) && !(flags & CLONE_FILES))
		__atomic_store_n(&g_shared, 1, __ATOMIC_RELAXED);
	return REAL(clone)(fn, stack, flags, arg, ptid, tls, ctid);
}

/* ---------------------------------------------------------------------------------------
 * stat of a device: GETATTR on an open file, LOOKUP for a path (docs/preload.md).
 */

static int device_getattr(int fd, struct fuse_attr *attr)
{
	struct fuse_in_header h;
	struct fuse_getattr_in in;
	memset(&in, 0, sizeof(in));
	struct iovec iov[2] = {{&h, sizeof(h)}, {&in, sizeof(in)}};
	struct call c;
	if (call_start(&c, fd, FUSE_GETATTR, iov, 2) != 0)
		return -1;
	struct fuse_out_header oh;
	struct fuse_attr_out out;
	struct iovec riov[2] = {{&oh, sizeof(oh)}, {&out, sizeof(out)}};
	ssize_t got = call_wait(&c, riov, 2);
	call_end(&c);
	if (got < 0)
		return -1;
	if ((size_t)got < sizeof(oh) + sizeof(out)) {
		errno = EIO;
		return -1;
	}
	*attr = out.attr;
	return 0;
}

static int device_lookup(const char *name, struct fuse_attr *attr)
{
	int s = connect_cusedev(1);
	if (s < 0)
		return -1;
	struct fuse_in_header h;
	struct iovec iov[2] = {{&h, sizeof(h)}, {(void *)name, strlen(name) + 1}};
	in_header(&h, FUSE_LOOKUP, 1, (uint32_t)iov_total(iov, 2));
	h.nodeid = FUSE_ROOT_ID;
	if (send_msg(s, iov, 2, -1) != 0) {
		REAL(close)(s);
		errno = ENOENT;
		return -1;
	}
	struct fuse_out_header oh;
	struct fuse_entry_out out;
	struct iovec riov[2] = {{&oh, sizeof(oh)}, {&out, sizeof(out)}};
	ssize_t got = conn_reply(s, riov, 2);
	int e = errno;
	REAL(close)(s);
	errno = e;
	if (got < 0)
		return -1;
	if ((size_t)got < sizeof(oh) + sizeof(out)) {
		errno = EIO;
		return -1;
	}
	*attr = out.attr;
	return 0;
}

/* The attributes of `fd` if it is a device descriptor (1), not one (0), or a failure (-1). */
static int fd_attr(int fd, struct fuse_attr *attr)
{
	if (LIKELY(device_slot(fd) == NULL))
		return 0;
	int saved = errno;
	if (device_getattr(fd, attr) != 0)
		return -1;
	errno = saved;
	return 1;
}

/* The same for a path (and, with AT_EMPTY_PATH, a descriptor). */
static int path_attr(int dirfd, const char *path, int flags, struct fuse_attr *attr)
{
	if ((flags & AT_EMPTY_PATH) && path != NULL && path[0] == '\0')
		return dirfd == AT_FDCWD ? 0 : fd_attr(dirfd, attr);
	const char *name = device_name(path);
	if (LIKELY(name == NULL))
		return 0;
	int saved = errno;
	if (device_lookup(name, attr) != 0)
		return -1;
	errno = saved;
	return 1;
}

/* new_decode_dev (include/linux/kdev_t.h): fuse_attr.rdev is the kernel's 32-bit encoding. */
static dev_t attr_rdev(const struct fuse_attr *a)
{
	return makedev((a->rdev & 0xfff00) >> 8, (a->rdev & 0xff) | ((a->rdev >> 12) & 0xfff00));
}

/* Fills a struct stat or stat64 from a fuse_attr; EOVERFLOW where a 32-bit field is too
 * small, as the kernel's cp_old_stat and glibc's conversions say. */
#define FILL_STAT(st, a)                                                                  \
	({                                                                                \
		int _bad = 0;                                                             \
		memset((st), 0, sizeof(*(st)));                                           \
		(st)->st_dev = g_root_dev;                                                \
		(st)->st_ino = (a)->ino;                                                  \
		(st)->st_mode = (a)->mode;                                                \
		(st)->st_nlink = (a)->nlink;                                              \
		(st)->st_uid = (a)->uid;                                                  \
		(st)->st_gid = (a)->gid;                                                  \
		(st)->st_rdev = attr_rdev(a);                                             \
		(st)->st_size = (a)->size;                                                \
		(st)->st_blksize = (a)->blksize ? (a)->blksize : PAGE;                    \
		(st)->st_blocks = (a)->blocks;                                            \
		(st)->st_atim.tv_sec = (time_t)(a)->atime;                                \
		(st)->st_atim.tv_nsec = (a)->atimensec;                                   \
		(st)->st_mtim.tv_sec = (time_t)(a)->mtime;                                \
		(st)->st_mtim.tv_nsec = (a)->mtimensec;                                   \
		(st)->st_ctim.tv_sec = (time_t)(a)->ctime;                                \
		(st)->st_ctim.tv_nsec = (a)->ctimensec;                                   \
		if ((uint64_t)(st)->st_ino != (a)->ino || (uint64_t)(st)->st_size != (a)->size) \
			_bad = 1;                                                         \
		if (_bad)                                                                 \
			errno = EOVERFLOW;                                                \
		_bad ? -1 : 0;                                                            \
	})

static void fill_statx(struct statx *x, const struct fuse_attr *a)
{
	memset(x, 0, sizeof(*x));
	x->stx_mask = STATX_BASIC_STATS;
	x->stx_blksize = a->blksize ? a->blksize : PAGE;
	x->stx_nlink = a->nlink;
	x->stx_uid = a->uid;
	x->stx_gid = a->gid;
	x->stx_mode = (uint16_t)a->mode;
	x->stx_ino = a->ino;
	x->stx_size = a->size;
	x->stx_blocks = a->blocks;
	x->stx_atime.tv_sec = (int64_t)a->atime;
	x->stx_atime.tv_nsec = a->atimensec;
	x->stx_mtime.tv_sec = (int64_t)a->mtime;
	x->stx_mtime.tv_nsec = a->mtimensec;
	x->stx_ctime.tv_sec = (int64_t)a->ctime;
	x->stx_ctime.tv_nsec = a->ctimensec;
	dev_t r = attr_rdev(a);
	x->stx_rdev_major = major(r);
	x->stx_rdev_minor = minor(r);
	x->stx_dev_major = major(g_root_dev);
	x->stx_dev_minor = minor(g_root_dev);
}

#define STAT_FD(real_call, fd, st)                  \
	do {                                        \
		struct fuse_attr _a;                \
		int _k = fd_attr((fd), &_a);        \
		if (LIKELY(_k == 0))                \
			return real_call;           \
		if (_k < 0)                         \
			return -1;                  \
		return FILL_STAT((st), &_a);        \
	} while (0)

#define STAT_PATH(real_call, dirfd, path, flags, st)         \
	do {                                                 \
		struct fuse_attr _a;                         \
		int _k = path_attr((dirfd), (path), (flags), &_a); \
		if (LIKELY(_k == 0))                         \
			return real_call;                    \
		if (_k < 0)                                  \
			return -1;                           \
		return FILL_STAT((st), &_a);                 \
	} while (0)

EXPORT int fstat(int fd, struct stat *st)
{
	STAT_FD(REAL(fstat)(fd, st), fd, st);
}

EXPORT int fstat64(int fd, struct stat64 *st)
{
	STAT_FD(REAL(fstat64)(fd, st), fd, st);
}

EXPORT int stat(const char *path, struct stat *st)
{
	STAT_PATH(REAL(stat)(path, st), AT_FDCWD, path, 0, st);
}

EXPORT int stat64(const char *path, struct stat64 *st)
{
	STAT_PATH(REAL(stat64)(path, st), AT_FDCWD, path, 0, st);
}

/* A device node is no symlink: lstat is stat. */
EXPORT int lstat(const char *path, struct stat *st)
{
	STAT_PATH(REAL(lstat)(path, st), AT_FDCWD, path, 0, st);
}

EXPORT int lstat64(const char *path, struct stat64 *st)
{
	STAT_PATH(REAL(lstat64)(path, st), AT_FDCWD, path, 0, st);
}

EXPORT int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
	STAT_PATH(REAL(fstatat)(dirfd, path, st, flags), dirfd, path, flags, st);
}

EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	STAT_PATH(REAL(fstatat64)(dirfd, path, st, flags), dirfd, path, flags, st);
}

/* The glibc < 2.33 entries binaries built then still call; a layout version this arch does
 * not have is EINVAL, as glibc says. */
#define XSTAT_CHECK(ver)                      \
	do {                                  \
		if (!XSTAT_VER_OK(ver)) {     \
			errno = EINVAL;       \
			return -1;            \
		}                             \
	} while (0)

EXPORT int __xstat(int ver, const char *path, struct stat *st)
{
	if (LIKELY(device_name(path) == NULL))
		return REAL(__xstat)(ver, path, st);
	XSTAT_CHECK(ver);
	STAT_PATH(REAL(__xstat)(ver, path, st), AT_FDCWD, path, 0, st);
}

EXPORT int __xstat64(int ver, const char *path, struct stat64 *st)
{
	if (LIKELY(device_name(path) == NULL))
		return REAL(__xstat64)(ver, path, st);
	XSTAT_CHECK(ver);
	STAT_PATH(REAL(__xstat64)(ver, path, st), AT_FDCWD, path, 0, st);
}

EXPORT int __lxstat(int ver, const char *path, struct stat *st)
{
	if (LIKELY(device_name(path) == NULL))
		return REAL(__lxstat)(ver, path, st);
	XSTAT_CHECK(ver);
	STAT_PATH(REAL(__lxstat)(ver, path, st), AT_FDCWD, path, 0, st);
}

EXPORT int __lxstat64(int ver, const char *path, struct stat64 *st)
{
	if (LIKELY(device_name(path) == NULL))
		return REAL(__lxstat64)(ver, path, st);
	XSTAT_CHECK(ver);
	STAT_PATH(REAL(__lxstat64)(ver, path, st), AT_FDCWD, path, 0, st);
}

EXPORT int __fxstat(int ver, int fd, struct stat *st)
{
	if (LIKELY(device_slot(fd) == NULL))
		return REAL(__fxstat)(ver, fd, st);
	XSTAT_CHECK(ver);
	STAT_FD(REAL(__fxstat)(ver, fd, st), fd, st);
}

EXPORT int __fxstat64(int ver, int fd, struct stat64 *st)
{
	if (LIKELY(device_slot(fd) == NULL))
		return REAL(__fxstat64)(ver, fd, st);
	XSTAT_CHECK(ver);
	STAT_FD(REAL(__fxstat64)(ver, fd, st), fd, st);
}

#define FXSTATAT(real_call, ver, dirfd, path, flags, st)          \
	do {                                                      \
		struct fuse_attr _a;                              \
		int _k = path_attr((dirfd), (path), (flags), &_a); \
		if (LIKELY(_k == 0))                              \
			return real_call;                         \
		XSTAT_CHECK(ver);                                 \
		if (_k < 0)                                       \
			return -1;                                \
		return FILL_STAT((st), &_a);                      \
	} while (0)

EXPORT int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
	FXSTATAT(REAL(__fxstatat)(ver, dirfd, path, st, flags), ver, dirfd, path, flags, st);
}

EXPORT int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
	FXSTATAT(REAL(__fxstatat64)(ver, dirfd, path, st, flags), ver, dirfd, path, flags, st);
}

EXPORT int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *x)
{
	struct fuse_attr a;
	int k = path_attr(dirfd, path, flags, &a);
	if (LIKELY(k == 0))
		return REAL(statx)(dirfd, path, flags, mask, x);
	if (k < 0)
		return -1;
	fill_statx(x, &a);
	return 0;
}

/* ---------------------------------------------------------------------------------------
 * Start-up: the configuration, and the device descriptors an exec'ing parent left us.
 */

static char *copy_env(const char *name)
{
	const char *v = getenv(name);
	if (v == NULL)
		return NULL;
	size_t n = strlen(v) + 1;
	char *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return NULL;
	memcpy(m, v, n);
	return m;
}

/* A socket connected to cusedev is a device file (nothing else connects there and stays). */
static void adopt(int fd)
{
	struct stat64 st;
	if (REAL(fstat64)(fd, &st) != 0 || !S_ISSOCK(st.st_mode))
		return;
	struct sockaddr_un peer;
	socklen_t len = sizeof(peer);
	memset(&peer, 0, sizeof(peer));
	if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0 || len != g_addr_len ||
	    memcmp(&peer, &g_addr, len) != 0)
		return;
	int prio = O_RDWR;
	socklen_t plen = sizeof(prio);
	if (getsockopt(fd, SOL_SOCKET, SO_PRIORITY, &prio, &plen) != 0)
		prio = O_RDWR;
	uint32_t acc = (uint32_t)prio & O_ACCMODE;
	slot_set(fd, acc, acc | OPEN_FORCED);
}

static void adopt_inherited(void)
{
	int dir = REAL(open)("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dir < 0) {
		/* No /proc: try the low numbers, where inherited descriptors mostly are. */
		for (int fd = 0; fd < 1024; fd++)
			adopt(fd);
		return;
	}
	char buf[4096];
	for (;;) {
		long n = syscall(SYS_getdents64, dir, buf, sizeof(buf));
		if (n <= 0)
			break;
		for (long off = 0; off < n;) {
			struct dirent64 *e = (struct dirent64 *)(buf + off);
			off += e->d_reclen;
			if (e->d_name[0] < '0' || e->d_name[0] > '9')
				continue;
			int fd = atoi(e->d_name);
			if (fd != dir)
				adopt(fd);
		}
	}
	REAL(close)(dir);
}

static void ep_prefork(void)
{
	ep_lock();
}

static void ep_postfork(void)
{
	ep_unlock();
}

__attribute__((constructor)) static void preload_init(void)
{
	int saved = errno;
	char *sock = copy_env("CUSEDEV_PRELOAD_SOCKET");
	char *paths = copy_env("CUSEDEV_PRELOAD_PATHS");
	char *root = copy_env("CUSEDEV_PRELOAD_ROOT");
	if (sock == NULL || paths == NULL || strlen(sock) >= sizeof(g_addr.sun_path)) {
		errno = saved;
		return;
	}
	if (root != NULL) {
		size_t n = strlen(root);
		while (n > 1 && root[n - 1] == '/')
			root[--n] = '\0';
		g_root = root;
		g_root_len = (n == 1 && root[0] == '/') ? 0 : n;
		struct stat64 st;
		if (REAL(stat64)(root, &st) == 0)
			g_root_dev = st.st_dev;
	}
	g_addr.sun_family = AF_UNIX;
	strcpy(g_addr.sun_path, sock);
	g_addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(sock) + 1);
	pthread_atfork(ep_prefork, ep_postfork, ep_postfork);
	int n = 0;
	for (char *p = paths; *p != '\0' && n < MAX_PATHS;) {
		char *end = strchr(p, ':');
		if (end != NULL)
			*end = '\0';
		if (p[0] == '/') {
			g_paths[n] = p;
			g_path_len[n] = strlen(p);
			n++;
		}
		if (end == NULL)
			break;
		p = end + 1;
	}
	adopt_inherited();
	/* Last: from here on opens of the listed paths are ours. */
	__atomic_store_n(&g_npaths, n, __ATOMIC_RELEASE);
	errno = saved;
}
