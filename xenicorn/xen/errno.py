"""Xen's error numbers, as hypercalls return them (negated) in RAX.

Values from xen/include/public/errno.h, which fixes them for every
architecture (they match Linux's x86 numbering).
"""
EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENXIO = 6
E2BIG = 7
EBADF = 9
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EEXIST = 17
EXDEV = 18
ENODEV = 19
EINVAL = 22
ENOSPC = 28
ERANGE = 34
ENOSYS = 38
ENODATA = 61
ETIME = 62
EOVERFLOW = 75
EOPNOTSUPP = 95
ETIMEDOUT = 110

NAMES = {v: k for k, v in dict(globals()).items() if k.isupper() and isinstance(v, int)}


def name(code: int) -> str:
    """``-14`` → ``-EFAULT``, for traces."""
    if code < 0 and -code in NAMES:
        return f"-{NAMES[-code]}"
    return str(code)
