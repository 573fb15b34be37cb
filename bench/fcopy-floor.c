/*
 * fcopy-floor: the floor of `make bench`.
 *
 * What: a small single-process FUSE server (libfuse3, low-level API) that serves
 * /dev/vmbus/hv_fcopy with the Linux 6.1 hvutil-transport fcopy protocol AND plays the
 * Hyper-V host itself: it copies one source file into a guest directory through Debian's
 * unmodified /usr/sbin/hv_fcopy_daemon (../shared/spec/fcopy.md sections 2, 5 and 6).
 *
 * Why: it is what a competent C engineer would write for the same job with no bus, no second
 * process and no threads, so the bench can say how far the project (fakehost + cusedev + the
 * daemon) is from the cheapest design on the same kernel interface. Everything it does the
 * project could also do: one single-threaded fuse_session_loop, direct_io, and the host's
 * next message produced in the daemon's read request itself (a pread of at most
 * DATA_FRAGMENT = 6144 bytes of the source, straight into the reply buffer).
 *
 * Protocol (one daemon, one file):
 *   daemon write(4) = version 1    -> queue the 4-byte reply 1 (FCOPY_CURRENT_VERSION)
 *   daemon read                    -> that reply; the device is now "registered"
 *   daemon read                    -> print "registered", wait for one byte (or EOF) on stdin,
 *                                     then START_FILE_COPY (1088 bytes, UTF-8 names)
 *   daemon write(4) = status       -> must be 0
 *   daemon read                    -> WRITE_TO_FILE (6196 bytes), until the file is sent,
 *                                     then COMPLETE_FCOPY (the 36-byte header)
 *   daemon write(4) = status 0 to COMPLETE -> print the elapsed time
 *   daemon read                    -> print "idle", wait for one byte (or EOF) on stdin, exit 0
 * Any other status, size or order is a failure: a message on stderr and exit status 1.
 * The second wait lets a harness read the processes' counters while all are still alive.
 *
 * The mount is a directory over /dev/vmbus holding the file hv_fcopy (mode 0600 root), as
 * the project's FUSE frontend does; run it inside a private mount namespace (unshare -m).
 *
 * Build: gcc -O2 -Wall -Wextra -o fcopy-floor fcopy-floor.c $(pkg-config --cflags --libs fuse3)
 *        (Debian: apt-get install libfuse3-dev fuse3 pkg-config gcc)
 * Usage: fcopy-floor [--create-path] [--overwrite] [--name NAME] SOURCE GUEST_DIR
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 31

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/hyperv.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MOUNT_DIR "/dev/vmbus"
#define NODE_NAME "hv_fcopy"
#define NODE_INO 2
#define NAME_MAX_BYTES (W_MAX_PATH - 1) /* the kernel's UTF-8 limit per name field */

_Static_assert(sizeof(struct hv_fcopy_hdr) == 36, "hv_fcopy_hdr");
_Static_assert(sizeof(struct hv_start_fcopy) == 1088, "hv_start_fcopy");
_Static_assert(sizeof(struct hv_do_fcopy) == 6196, "hv_do_fcopy");

enum state {
	ST_WAIT_REGISTER, /* nothing happened yet: the daemon must write its version */
	ST_VERSION_QUEUED, /* the version reply waits for the daemon's read */
	ST_READY, /* registered; the next read gets START */
	ST_WAIT_STATUS, /* a message was read; the daemon's status write is due */
	ST_SENDING, /* the next read gets the next WRITE_TO_FILE or COMPLETE */
	ST_DONE, /* COMPLETE acknowledged */
};

static struct {
	struct fuse_session *se;
	enum state state;
	int failed;
	int opened;
	/* the source */
	int src_fd;
	uint64_t size, offset, fragments;
	char file_name[NAME_MAX_BYTES + 1], path_name[NAME_MAX_BYTES + 1];
	uint32_t flags;
	/* the one message slot of the transport */
	union {
		uint32_t version;
		struct hv_fcopy_hdr hdr;
		struct hv_start_fcopy start;
		struct hv_do_fcopy data;
	} msg;
	size_t msg_len; /* 0: nothing queued */
	uint32_t sent_op; /* operation whose status is due */
	struct timespec t0;
} g;

static const char *op_name(uint32_t op)
{
	switch (op) {
	case START_FILE_COPY: return "START_FILE_COPY";
	case WRITE_TO_FILE: return "WRITE_TO_FILE";
	case COMPLETE_FCOPY: return "COMPLETE_FCOPY";
	default: return "?";
	}
}

static const char *status_name(uint32_t status)
{
	switch (status) {
	case HV_ERROR_ALREADY_EXISTS: return "file exists";
	case HV_ERROR_DISK_FULL: return "disk full";
	case HV_E_FAIL: return "failure";
	default: return "unknown status";
	}
}

/* Reports a failure, stops the session; the request at hand gets errno `err`. */
static void fail(fuse_req_t req, int err, const char *fmt, ...)
{
	va_list ap;

	fputs("fcopy-floor: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	g.failed = 1;
	fuse_session_exit(g.se);
	if (req)
		fuse_reply_err(req, err);
}

/* Waits for one byte or EOF on stdin. Returns 0, or -1 if the session is being stopped. */
static int wait_stdin(void)
{
	char c;

	for (;;) {
		ssize_t n = read(STDIN_FILENO, &c, 1);

		if (n >= 0)
			return 0;
		if (errno != EINTR) {
			perror("fcopy-floor: read stdin");
			return -1;
		}
		if (fuse_session_exited(g.se))
			return -1;
	}
}

static double elapsed(void)
{
	struct timespec t1;

	if (clock_gettime(CLOCK_MONOTONIC, &t1) != 0) {
		perror("fcopy-floor: clock_gettime");
		exit(1);
	}
	return (double)(t1.tv_sec - g.t0.tv_sec) + (double)(t1.tv_nsec - g.t0.tv_nsec) / 1e9;
}

static void queue_start(void)
{
	memset(&g.msg.start, 0, sizeof(g.msg.start));
	g.msg.start.hdr.operation = START_FILE_COPY;
	/* The kernel hands the daemon UTF-8 in the UTF-16 fields, NUL-terminated. */
	memcpy(g.msg.start.file_name, g.file_name, strlen(g.file_name));
	memcpy(g.msg.start.path_name, g.path_name, strlen(g.path_name));
	g.msg.start.copy_flags = g.flags;
	g.msg.start.file_size = g.size;
	g.msg_len = sizeof(g.msg.start);
}

/* The next WRITE_TO_FILE, or COMPLETE_FCOPY once the whole file was sent. -1 on error. */
static int queue_next(void)
{
	size_t want, got = 0;

	if (g.offset == g.size) {
		memset(&g.msg.hdr, 0, sizeof(g.msg.hdr));
		g.msg.hdr.operation = COMPLETE_FCOPY;
		g.msg_len = sizeof(g.msg.hdr);
		return 0;
	}
	want = g.size - g.offset < DATA_FRAGMENT ? (size_t)(g.size - g.offset) : DATA_FRAGMENT;
	while (got < want) {
		ssize_t n = pread(g.src_fd, g.msg.data.data + got, want - got,
				  (off_t)(g.offset + got));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			perror("fcopy-floor: pread source");
			return -1;
		}
		if (n == 0) {
			fprintf(stderr, "fcopy-floor: the source shrank: EOF at %llu of %llu bytes\n",
				(unsigned long long)(g.offset + got), (unsigned long long)g.size);
			return -1;
		}
		got += (size_t)n;
	}
	memset(&g.msg.data, 0, offsetof(struct hv_do_fcopy, data)); /* header, pad */
	g.msg.data.hdr.operation = WRITE_TO_FILE;
	g.msg.data.offset = g.offset;
	g.msg.data.size = (uint32_t)want;
	if (want < DATA_FRAGMENT)
		memset(g.msg.data.data + want, 0, DATA_FRAGMENT - want);
	g.offset += want;
	g.fragments++;
	g.msg_len = sizeof(g.msg.data);
	return 0;
}

static void fill_attr(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
	} else {
		st->st_mode = S_IFREG | 0600;
		st->st_nlink = 1;
	}
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;

	if (parent != FUSE_ROOT_ID || strcmp(name, NODE_NAME) != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = NODE_INO;
	e.attr_timeout = 1.0;
	e.entry_timeout = 1.0;
	fill_attr(NODE_INO, &e.attr);
	fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (ino != FUSE_ROOT_ID && ino != NODE_INO) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_attr(ino, &st);
	fuse_reply_attr(req, &st, 1.0);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	static const char *const names[] = { ".", "..", NODE_NAME };
	static const fuse_ino_t inos[] = { FUSE_ROOT_ID, FUSE_ROOT_ID, NODE_INO };
	char buf[256];
	size_t used = 0;
	struct stat st;

	(void)fi;
	if (ino != FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	for (; off >= 0 && off < 3; off++) {
		size_t n;

		fill_attr(inos[off], &st);
		n = fuse_add_direntry(req, buf + used, sizeof(buf) - used, names[off], &st,
				      off + 1);
		if (n > sizeof(buf) - used || used + n > size)
			break;
		used += n;
	}
	fuse_reply_buf(req, buf, used);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != NODE_INO) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (g.opened) { /* one opener, as hvutil_transport */
		fuse_reply_err(req, EBUSY);
		return;
	}
	if (g.state != ST_WAIT_REGISTER) {
		fail(req, EBADF, "the daemon reopened the device (state %d): it hit an error",
		     (int)g.state);
		return;
	}
	g.opened = 1;
	fi->direct_io = 1; /* every read/write reaches us, at the caller's size */
	fuse_reply_open(req, fi);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	g.opened = 0;
	if (g.state != ST_DONE && !g.failed)
		fail(NULL, 0, "the daemon closed the device before the copy was complete");
	fuse_reply_err(req, 0);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)ino;
	(void)off; /* offsets are ignored, as by the driver */
	(void)fi;
	if (g.msg_len == 0) {
		switch (g.state) {
		case ST_READY:
			printf("fcopy-floor: registered; waiting for the start byte on stdin\n");
			if (wait_stdin() != 0) {
				fail(req, EINTR, "stopped before the copy started");
				return;
			}
			if (clock_gettime(CLOCK_MONOTONIC, &g.t0) != 0) {
				fail(req, EIO, "clock_gettime: %s", strerror(errno));
				return;
			}
			queue_start();
			break;
		case ST_SENDING:
			if (queue_next() != 0) {
				fail(req, EIO, "cannot produce the next message");
				return;
			}
			break;
		case ST_DONE:
			printf("fcopy-floor: idle; waiting for the exit byte on stdin\n");
			wait_stdin();
			fuse_session_exit(g.se);
			fuse_reply_err(req, EBADF); /* what the driver's readers get at teardown */
			return;
		default:
			fail(req, EIO, "the daemon read in state %d, where nothing can be queued",
			     (int)g.state);
			return;
		}
	}
	if (size < g.msg_len) { /* the driver keeps the message queued */
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (g.state == ST_VERSION_QUEUED) {
		g.state = ST_READY;
	} else {
		g.sent_op = g.msg.hdr.operation;
		g.state = ST_WAIT_STATUS;
	}
	size = g.msg_len;
	g.msg_len = 0;
	fuse_reply_buf(req, (const char *)&g.msg, size);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	uint32_t value;

	(void)ino;
	(void)off;
	(void)fi;
	if (size != sizeof(value)) {
		fail(req, EINVAL, "the daemon wrote %zu bytes, not 4", size);
		return;
	}
	memcpy(&value, buf, sizeof(value));
	switch (g.state) {
	case ST_WAIT_REGISTER:
		if (value != FCOPY_VERSION_1) {
			fail(req, EINVAL, "the daemon registered with version %u; only 1 is served",
			     value);
			return;
		}
		g.msg.version = FCOPY_CURRENT_VERSION;
		g.msg_len = sizeof(g.msg.version);
		g.state = ST_VERSION_QUEUED;
		break;
	case ST_WAIT_STATUS:
		if (value != 0) {
			if (g.sent_op == WRITE_TO_FILE) /* the slot still holds that fragment */
				fail(req, EINVAL, "the daemon answered 0x%08x (%s) to WRITE_TO_FILE at offset %llu",
				     value, status_name(value), (unsigned long long)g.msg.data.offset);
			else
				fail(req, EINVAL, "the daemon answered 0x%08x (%s) to %s", value,
				     status_name(value), op_name(g.sent_op));
			return;
		}
		if (g.sent_op == COMPLETE_FCOPY) {
			double s = elapsed();

			g.state = ST_DONE;
			printf("fcopy-floor: complete: %llu bytes in %llu fragments, %.6f s, %.1f MB/s\n",
			       (unsigned long long)g.size, (unsigned long long)g.fragments, s,
			       s > 0 ? (double)g.size / s / 1e6 : 0.0);
		} else {
			g.state = ST_SENDING;
		}
		break;
	default:
		fail(req, EINVAL, "unexpected write of %u in state %d", value, (int)g.state);
		return;
	}
	fuse_reply_write(req, size);
}

static const struct fuse_lowlevel_ops ops = {
	.lookup = op_lookup,
	.getattr = op_getattr,
	.open = op_open,
	.release = op_release,
	.readdir = op_readdir,
	.read = op_read,
	.write = op_write,
};

static void usage(void)
{
	fprintf(stderr, "usage: fcopy-floor [--create-path] [--overwrite] [--name NAME] "
			"SOURCE GUEST_DIR\n");
	exit(2);
}

static void set_name(char *dst, const char *src, const char *what)
{
	size_t n = strlen(src);

	if (n == 0 || n > NAME_MAX_BYTES) {
		fprintf(stderr, "fcopy-floor: %s must be 1..%d bytes of UTF-8: %s\n", what,
			NAME_MAX_BYTES, src);
		exit(2);
	}
	memcpy(dst, src, n + 1);
}

int main(int argc, char **argv)
{
	char *fuse_argv[] = { argv[0], "-o",
			      "allow_other,default_permissions,fsname=fcopy-floor,subtype=fcopy-floor",
			      NULL };
	struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
	const char *name = NULL, *src, *dir, *slash;
	char path[NAME_MAX_BYTES + 2];
	struct stat st;
	int i, rc;

	for (i = 1; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
		if (strcmp(argv[i], "--create-path") == 0)
			g.flags |= CREATE_PATH;
		else if (strcmp(argv[i], "--overwrite") == 0)
			g.flags |= OVER_WRITE;
		else if (strcmp(argv[i], "--name") == 0 && i + 1 < argc)
			name = argv[++i];
		else
			usage();
	}
	if (argc - i != 2)
		usage();
	src = argv[i];
	dir = argv[i + 1];
	if (!dir[0])
		usage();
	if (!name) {
		slash = strrchr(src, '/');
		name = slash ? slash + 1 : src;
	}
	set_name(g.file_name, name, "the file name");
	/* The daemon creates only path components followed by '/', so end with one. */
	if (snprintf(path, sizeof(path), "%s%s", dir,
		     dir[strlen(dir) - 1] == '/' ? "" : "/") >= (int)sizeof(path)) {
		fprintf(stderr, "fcopy-floor: the guest directory is longer than %d bytes\n",
			NAME_MAX_BYTES);
		return 2;
	}
	set_name(g.path_name, path, "the guest directory");

	if (setvbuf(stdout, NULL, _IOLBF, 0) != 0) {
		perror("fcopy-floor: setvbuf");
		return 1;
	}
	g.src_fd = open(src, O_RDONLY | O_CLOEXEC);
	if (g.src_fd < 0 || fstat(g.src_fd, &st) != 0) {
		fprintf(stderr, "fcopy-floor: %s: %s\n", src, strerror(errno));
		return 1;
	}
	if (!S_ISREG(st.st_mode)) {
		fprintf(stderr, "fcopy-floor: %s is not a regular file\n", src);
		return 1;
	}
	g.size = (uint64_t)st.st_size;
	if (mkdir(MOUNT_DIR, 0755) != 0 && errno != EEXIST) {
		fprintf(stderr, "fcopy-floor: mkdir %s: %s\n", MOUNT_DIR, strerror(errno));
		return 1;
	}

	g.se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (!g.se) {
		fprintf(stderr, "fcopy-floor: fuse_session_new failed\n");
		return 1;
	}
	if (fuse_set_signal_handlers(g.se) != 0) {
		fprintf(stderr, "fcopy-floor: fuse_set_signal_handlers failed\n");
		fuse_session_destroy(g.se);
		return 1;
	}
	if (fuse_session_mount(g.se, MOUNT_DIR) != 0) {
		fprintf(stderr, "fcopy-floor: cannot mount FUSE on %s\n", MOUNT_DIR);
		fuse_remove_signal_handlers(g.se);
		fuse_session_destroy(g.se);
		return 1;
	}
	printf("fcopy-floor: serving %s/%s: %s -> %s%s, %llu bytes, flags 0x%x\n", MOUNT_DIR,
	       NODE_NAME, src, g.path_name, g.file_name, (unsigned long long)g.size, g.flags);

	rc = fuse_session_loop(g.se);
	fuse_session_unmount(g.se);
	fuse_remove_signal_handlers(g.se);
	fuse_session_destroy(g.se);
	if (g.failed)
		return 1;
	if (g.state != ST_DONE) {
		fprintf(stderr, "fcopy-floor: stopped before the copy was complete%s\n",
			rc ? " (session error)" : "");
		return 1;
	}
	return 0;
}
