/* Console output on the debug port 0xE9, and a small printf. */
#include "kernel.h"

void putchar(int c) { outb(0xE9, (u8)c); }
void puts(const char *s) { while (*s) putchar(*s++); }

void *memset(void *d, int c, ulong n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, ulong n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }
int memcmp(const void *a, const void *b, ulong n) {
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++) if (*p != *q) return *p - *q;
    return 0;
}
ulong strlen(const char *s) { ulong n = 0; while (s[n]) n++; return n; }
int strcmp(const char *a, const char *b) { while (*a && *a == *b) a++, b++; return (u8)*a - (u8)*b; }

int cmdline_has(const char *cmdline, const char *key, const char *val) {
    ulong k = strlen(key), v = strlen(val);
    for (const char *w = cmdline; w && *w; w++)
        if ((w == cmdline || w[-1] == ' ') && !memcmp(w, key, k) && w[k] == '=' &&
            !memcmp(w + k + 1, val, v) && (w[k + 1 + v] == ' ' || w[k + 1 + v] == 0))
            return 1;
    return 0;
}

struct out { char *buf; ulong size, pos; };
static void emit(struct out *o, char c) { if (o->pos + 1 < o->size) o->buf[o->pos] = c; o->pos++; }

/* 64-by-32 division without libgcc (a 32-bit build has no __udivmoddi4). */
u64 divmod64(u64 n, u32 d, u32 *rem) {
    u64 q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) { r -= d; q |= 1ULL << i; }
    }
    *rem = (u32)r;
    return q;
}

static void number(struct out *o, u64 v, int base, int width, char pad, int neg) {
    char tmp[24]; int n = 0; u32 digit;
    do { v = divmod64(v, base, &digit); tmp[n++] = "0123456789abcdef"[digit]; } while (v);
    if (neg) tmp[n++] = '-';
    while (n < width) tmp[n++] = pad;
    while (n) emit(o, tmp[--n]);
}

int vsnprintf(char *buf, ulong size, const char *fmt, va_list ap) {
    struct out o = { buf, size, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') { emit(&o, *fmt); continue; }
        fmt++;
        int alt = 0, width = 0, longs = 0; char pad = ' ';
        if (*fmt == '#') { alt = 1; fmt++; }
        if (*fmt == '0') { pad = '0'; fmt++; }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') { longs++; fmt++; }
        u64 v; slong sv;
        switch (*fmt) {
        case 'd': case 'i':
            sv = longs > 1 ? (slong)va_arg(ap, long long) : longs ? va_arg(ap, long) : va_arg(ap, int);
            number(&o, sv < 0 ? -(u64)sv : (u64)sv, 10, width, pad, sv < 0); break;
        case 'u':
            v = longs > 1 ? va_arg(ap, u64) : longs ? va_arg(ap, ulong) : va_arg(ap, u32);
            number(&o, v, 10, width, pad, 0); break;
        case 'x': case 'p':
            v = *fmt == 'p' ? (ulong)va_arg(ap, void *) :
                longs > 1 ? va_arg(ap, u64) : longs ? va_arg(ap, ulong) : va_arg(ap, u32);
            if (alt || *fmt == 'p') { emit(&o, '0'); emit(&o, 'x'); }
            number(&o, v, 16, width, pad, 0); break;
        case 's': { const char *s = va_arg(ap, const char *); if (!s) s = "(null)";
                    ulong n = strlen(s); while ((int)n < width--) emit(&o, ' '); while (*s) emit(&o, *s++); break; }
        case 'c': emit(&o, (char)va_arg(ap, int)); break;
        case '%': emit(&o, '%'); break;
        default: emit(&o, '%'); emit(&o, *fmt); break;
        }
    }
    if (size) buf[o.pos < size ? o.pos : size - 1] = 0;
    return (int)o.pos;
}

int snprintf(char *buf, ulong size, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt); int n = vsnprintf(buf, size, fmt, ap); va_end(ap); return n;
}

int printf(const char *fmt, ...) {
    char buf[512]; va_list ap;
    va_start(ap, fmt); int n = vsnprintf(buf, sizeof(buf), fmt, ap); va_end(ap);
    puts(buf);
    return n;
}
