#define _GNU_SOURCE
/* tlssink: a minimal SMTP sink that offers STARTTLS, for scripts/bench
 * (modes tls and published; built at run time: cc -O2 tlssink.c -lssl
 * -lcrypto).  Like smtp-sink, which has no STARTTLS: one thread, epoll,
 * non-blocking sockets.  Accepts any EHLO/MAIL/RCPT, takes DATA up to
 * the lone ".", answers 250 and forgets the
 * message.  With a third argument "chunking" it also offers CHUNKING and
 * takes BDAT (RFC 3030): counted octets, 250 per chunk (smtp-sink has no
 * BDAT).  Events on stdout, one line each, unbuffered:
 *   S <sessions>                      a connection was accepted
 *   T <tls sessions> <version> <cipher>  a STARTTLS handshake completed
 *   M <messages>                      a message's final dot (or BDAT LAST) was received
 *   B <messages>                      of them, the ones that came with BDAT
 * usage: tlssink PORT KEY_AND_CHAIN.pem [chunking]
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <openssl/ssl.h>
#include <openssl/err.h>

#define INBUF 65536
#define OUTBUF 8192

struct conn {
    int fd;
    SSL *ssl;
    int handshaking;       /* SSL_accept not finished */
    int want_write;        /* waiting for EPOLLOUT */
    int data;              /* inside DATA */
    int bol;               /* (DATA) at the beginning of a line */
    int closing;           /* close once the output is flushed */
    int bdat_last;         /* the chunk being read is the message's last */
    size_t bdat_left;      /* octets of the BDAT chunk still to come */
    size_t inlen, outlen, outoff;
    char in[INBUF];
    char out[OUTBUF];
};

static SSL_CTX *ctx;
static int ep;
static unsigned long sessions, tls_sessions, messages, bdat_messages;
static int chunking;

static void event(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void event(const char *fmt, ...) {
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0 && write(1, line, (size_t)n) < 0) { /* the reader went away */ }
}

static void arm(struct conn *c) {
    struct epoll_event ev = {.events = EPOLLIN | (c->want_write ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void drop(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl) SSL_free(c->ssl);
    close(c->fd);
    free(c);
}

static void reply(struct conn *c, const char *s) {
    size_t n = strlen(s);
    if (c->outlen + n > OUTBUF) return;  /* cannot happen with these replies */
    memcpy(c->out + c->outlen, s, n);
    c->outlen += n;
}

/* Send what is pending; 0 ok (maybe partial, want_write set), -1 dead. */
static int flush(struct conn *c) {
    while (c->outoff < c->outlen) {
        size_t left = c->outlen - c->outoff;
        if (c->ssl) {
            int r = SSL_write(c->ssl, c->out + c->outoff, (int)left);
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    c->want_write = 1;
                    arm(c);
                    return 0;
                }
                return -1;
            }
            c->outoff += (size_t)r;
        } else {
            ssize_t r = send(c->fd, c->out + c->outoff, left, MSG_NOSIGNAL);
            if (r < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    c->want_write = 1;
                    arm(c);
                    return 0;
                }
                return -1;
            }
            c->outoff += (size_t)r;
        }
    }
    c->outlen = c->outoff = 0;
    if (c->want_write) {
        c->want_write = 0;
        arm(c);
    }
    return 0;
}

static int starttls(struct conn *c);

static int prefix(const char *line, size_t n, const char *cmd) {
    size_t k = strlen(cmd);
    return n >= k && strncasecmp(line, cmd, k) == 0;
}

/* One complete line (without CRLF); returns -1 to close now, 1 after STARTTLS. */
static int command(struct conn *c, const char *line, size_t n) {
    if (c->data) {
        if (n == 1 && line[0] == '.') {
            c->data = 0;
            messages++;
            char buf[80];
            snprintf(buf, sizeof buf, "250 2.0.0 Ok: queued as %lu\r\n", messages);
            reply(c, buf);
            event("M %lu\n", messages);
        }
        return 0;
    }
    if (prefix(line, n, "EHLO")) {
        reply(c, "250-peer.bench.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                 "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n");
        if (chunking) reply(c, "250-CHUNKING\r\n");
        reply(c, c->ssl ? "250 SMTPUTF8\r\n" : "250-SMTPUTF8\r\n250 STARTTLS\r\n");
    } else if (prefix(line, n, "HELO")) {
        reply(c, "250 peer.bench.test\r\n");
    } else if (prefix(line, n, "STARTTLS") && !c->ssl) {
        reply(c, "220 2.0.0 Ready to start TLS\r\n");
        return 1;
    } else if (prefix(line, n, "MAIL")) {
        reply(c, "250 2.1.0 Ok\r\n");
    } else if (prefix(line, n, "RCPT")) {
        reply(c, "250 2.1.5 Ok\r\n");
    } else if (prefix(line, n, "DATA")) {
        reply(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
        c->data = 1;
        c->bol = 1;
    } else if (chunking && prefix(line, n, "BDAT ")) {
        char num[32];
        size_t k = 0;
        while (5 + k < n && k < sizeof num - 1 && line[5 + k] >= '0' && line[5 + k] <= '9') {
            num[k] = line[5 + k];
            k++;
        }
        num[k] = 0;
        if (!k) return -1;  /* the chunk's end is unknown */
        c->bdat_left = strtoull(num, NULL, 10);
        c->bdat_last = n >= 5 + k + 5 && strncasecmp(line + 5 + k, " LAST", 5) == 0;
        return 2;
    } else if (prefix(line, n, "RSET") || prefix(line, n, "NOOP")) {
        reply(c, "250 2.0.0 Ok\r\n");
    } else if (prefix(line, n, "QUIT")) {
        reply(c, "221 2.0.0 Bye\r\n");
        c->closing = 1;
    } else {
        reply(c, "502 5.5.2 Error: command not recognized\r\n");
    }
    return 0;
}

/* The BDAT chunk is complete: answer it. */
static void chunk_done(struct conn *c) {
    if (c->bdat_last) {
        messages++;
        bdat_messages++;
        char buf[80];
        snprintf(buf, sizeof buf, "250 2.0.0 Ok: queued as %lu\r\n", messages);
        reply(c, buf);
        event("M %lu\nB %lu\n", messages, bdat_messages);
    } else {
        reply(c, "250 2.0.0 Ok: chunk received\r\n");
    }
}

/* Handle every complete line (and BDAT octets) in the input buffer. */
static int process(struct conn *c) {
    size_t start = 0;
    for (;;) {
        if (c->bdat_left) {
            size_t take = c->inlen - start < c->bdat_left ? c->inlen - start : c->bdat_left;
            start += take;
            c->bdat_left -= take;
            if (c->bdat_left) break;
            chunk_done(c);
            continue;
        }
        char *nl = memchr(c->in + start, '\n', c->inlen - start);
        if (!nl) break;
        size_t end = (size_t)(nl - c->in);
        size_t n = end - start;
        if (n && c->in[start + n - 1] == '\r') n--;
        int r = command(c, c->in + start, n);
        start = end + 1;
        if (r < 0) return -1;
        if (r == 2) {  /* BDAT: its octets follow (BDAT 0 is done at once) */
            if (!c->bdat_left) chunk_done(c);
            continue;
        }
        if (r == 1) {  /* STARTTLS: anything pipelined after it is discarded */
            c->inlen = 0;
            if (flush(c) < 0) return -1;
            return starttls(c);
        }
        if (c->closing) break;
    }
    memmove(c->in, c->in + start, c->inlen - start);
    c->inlen -= start;
    if (c->inlen == INBUF) {  /* a line longer than the buffer */
        if (!c->data) return -1;
        c->inlen = 0;  /* (DATA) skip it */
    }
    return 0;
}

static int handshake(struct conn *c) {
    int r = SSL_accept(c->ssl);
    if (r == 1) {
        c->handshaking = 0;
        tls_sessions++;
        event("T %lu %s %s\n", tls_sessions, SSL_get_version(c->ssl),
              SSL_CIPHER_get_name(SSL_get_current_cipher(c->ssl)));
        if (c->want_write) { c->want_write = 0; arm(c); }
        return 0;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        if (c->want_write) { c->want_write = 0; arm(c); }
        return 0;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        c->want_write = 1;
        arm(c);
        return 0;
    }
    return -1;
}

static int starttls(struct conn *c) {
    c->ssl = SSL_new(ctx);
    if (!c->ssl) return -1;
    SSL_set_mode(c->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_set_fd(c->ssl, c->fd);
    c->handshaking = 1;
    return handshake(c);
}

/* Read what is there; -1 to close. */
static int readable(struct conn *c) {
    for (;;) {
        if (c->handshaking) {
            if (handshake(c) < 0) return -1;
            if (c->handshaking) return 0;
        }
        size_t room = INBUF - c->inlen;
        ssize_t r;
        if (c->ssl) {
            int k = SSL_read(c->ssl, c->in + c->inlen, (int)room);
            if (k <= 0) {
                int e = SSL_get_error(c->ssl, k);
                if (e == SSL_ERROR_WANT_READ) break;
                if (e == SSL_ERROR_WANT_WRITE) { c->want_write = 1; arm(c); break; }
                return -1;
            }
            r = k;
        } else {
            r = recv(c->fd, c->in + c->inlen, room, 0);
            if (r < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                return -1;
            }
            if (r == 0) return -1;
        }
        c->inlen += (size_t)r;
        int had_ssl = c->ssl != NULL;
        if (process(c) < 0) return -1;
        if (!had_ssl && c->ssl) continue;  /* STARTTLS started: read the handshake */
        if (c->closing) break;
    }
    if (flush(c) < 0) return -1;
    if (c->closing && c->outlen == 0) return -1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 4 && strcmp(argv[3], "chunking") == 0)) {
        fprintf(stderr, "usage: %s PORT KEY_AND_CHAIN.pem [chunking]\n", argv[0]);
        return 2;
    }
    chunking = argc == 4;
    signal(SIGPIPE, SIG_IGN);
    ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[2], SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    sessions++;
                    event("S %lu\n", sessions);
                    reply(c, "220 peer.bench.test ESMTP tlssink\r\n");
                    if (flush(c) < 0) drop(c);
                }
                continue;
            }
            int dead = 0;
            if (evs[i].events & (EPOLLERR | EPOLLHUP) && !(evs[i].events & EPOLLIN)) dead = 1;
            if (!dead && (evs[i].events & EPOLLOUT)) {
                if (c->handshaking) {
                    if (handshake(c) < 0) dead = 1;
                } else if (flush(c) < 0) {
                    dead = 1;
                } else if (c->closing && c->outlen == 0) {
                    dead = 1;
                }
            }
            if (!dead && (evs[i].events & EPOLLIN)) {
                if (readable(c) < 0) dead = 1;
            }
            if (dead) drop(c);
        }
    }
}
