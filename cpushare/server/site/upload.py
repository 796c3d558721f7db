"""
An image uploaded from a browser's plain form (multipart/form-data),
streamed into the image store as the control channel's upload is
(L{cpushare.server.images.ImageStore}: the same quota, checks and files).

twisted.web keeps a large request body in a temporary file, but would
parse a multipart body into memory whole; the web port's requests
(L{cpushare.server.web.WebRequest}) do not, and call L{readForm} instead:
it reads only the form's first fields (the CSRF token, the image's name)
from the start of the body, at most FORM_HEAD bytes, and where the file,
the form's last field, begins and ends.  The file's bytes are then hashed
and copied from the body, a chunk at a time, on the image store's thread:
never whole in memory, never on the reactor.
"""

import hashlib
import os
import re

from cpushare.protocol.commands import BadRequest
from cpushare.server.images import MAX_NAME

# Bytes of a form's start read for its fields before the file.
FORM_HEAD = 64 * 1024
# What a form adds to its file (boundaries, headers, the small fields): a
# body may be this much larger than the largest image it may carry.
FORM_SLACK = FORM_HEAD
# Bytes copied into the image store at a time.
CHUNK = 1024 * 1024
# Small fields a form may carry before its file, and their size.
MAX_FIELDS = 8
MAX_FIELD = 4096

_BOUNDARY = re.compile(rb'boundary="?([0-9A-Za-z\'()+_,./:=?-]{1,70})"?')
_NAME = re.compile(rb'\bname="([^"]{1,64})"')
_FILENAME = re.compile(rb'\bfilename="([^"]{0,1024})"')


class Form:
    """A multipart form's small fields (in C{request.args}) and where its file lies."""

    def __init__(self, start=None, end=None, filename=None, problem=None):
        self.start = start
        self.end = end
        self.filename = filename
        self.problem = problem


def isMultipart(contentType):
    return bool(contentType) and contentType.split(b";")[0].strip().lower() \
        == b"multipart/form-data"


def readForm(content, contentType, args):
    """
    The L{Form} of a multipart body in the file C{content}: its fields
    before the file go into C{args} (as twisted.web's request.args);
    a body that is not such a form gets a Form with a C{problem}.
    """
    found = _BOUNDARY.search(contentType or b"")
    if found is None:
        return Form(problem="the form has no multipart boundary")
    boundary = b"--" + found.group(1)
    content.seek(0, os.SEEK_END)
    length = content.tell()
    content.seek(0)
    head = content.read(FORM_HEAD)
    if not head.startswith(boundary + b"\r\n"):
        return Form(problem="the form does not start with its boundary")
    at = len(boundary) + 2
    for _ in range(MAX_FIELDS + 1):
        headersEnd = head.find(b"\r\n\r\n", at)
        if headersEnd < 0:
            return Form(problem="the form's fields before the file are too long")
        headers = head[at:headersEnd]
        name = _NAME.search(headers)
        filename = _FILENAME.search(headers)
        body = headersEnd + 4
        if filename is not None:
            return _fileField(content, boundary, length, body, filename.group(1))
        valueEnd = head.find(b"\r\n" + boundary, body)
        if valueEnd < 0 or valueEnd - body > MAX_FIELD:
            return Form(problem="a field of the form is too long")
        if name is not None:
            args.setdefault(name.group(1), []).append(head[body:valueEnd])
        at = valueEnd + 2 + len(boundary)
        if head[at:at + 2] == b"--":
            return Form()
        at += 2
    return Form(problem=f"the form has more than {MAX_FIELDS} fields")


def _fileField(content, boundary, length, start, filename):
    """The file, which must be the form's last field: the body ends right after it."""
    closing = b"\r\n" + boundary + b"--"
    content.seek(max(0, length - len(closing) - 2))
    tail = content.read()
    content.seek(0)
    if tail.endswith(closing + b"\r\n"):
        end = length - len(closing) - 2
    elif tail.endswith(closing):
        end = length - len(closing)
    else:
        return Form(problem="the file must be the form's last field")
    if end < start:
        return Form(problem="the form's file field is cut short")
    name = os.path.basename(filename.decode("utf-8", "replace").replace("\\", "/"))
    return Form(start, end, name)


def imageName(given, filename):
    """The name an uploaded image is listed by: as given, else the file's, checked."""
    name = (given or "").strip() or (filename or "").strip()
    if not name:
        raise BadRequest("give the image a name")
    if len(name) > MAX_NAME or "\n" in name or "\r" in name:
        raise BadRequest(f"the image name must be 1 to {MAX_NAME} characters on one line")
    return name


async def storeImage(images, account, content, form, given=None):
    """
    Store the form's file as one of C{account}'s images (as ImageUpload
    does), named C{given} or as the file; its sha256, or None when the
    account already holds it.  BadRequest (QuotaExceeded over the quota)
    says why not.
    """
    if form is not None and form.problem is not None:
        raise BadRequest(form.problem)
    if form is None or form.start is None:
        raise BadRequest("choose an ISO file to upload")
    name = imageName(given, form.filename)
    size = form.end - form.start
    if size <= 0:
        raise BadRequest("the file is empty: choose an ISO file to upload")
    sha256 = await images.inThread(_hash, content, form.start, size)
    upload = await images.begin(account, sha256, size, name)
    if upload is None:
        return None
    try:
        offset = 0
        while offset < size:
            data = await images.inThread(_read, content, form.start + offset,
                                         min(CHUNK, size - offset))
            await upload.write(offset, data)
            offset += len(data)
        await images.complete(upload)
    except BaseException:
        upload.abort()
        raise
    return sha256


def _read(content, offset, length):
    content.seek(offset)
    return content.read(length)


def _hash(content, start, size):
    digest = hashlib.sha256()
    content.seek(start)
    left = size
    while left:
        data = content.read(min(CHUNK, left))
        if not data:
            raise BadRequest("the form's file is cut short")
        digest.update(data)
        left -= len(data)
    return digest.hexdigest()
