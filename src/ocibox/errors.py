"""The few exception classes ocibox raises. The CLI maps them to exit codes (see design.md).

Every error carries one human line: the CLI prints `ocibox: <message>` and exits with `exit_code`.
Exit codes follow `docker run`: 125 for an ocibox error, 126 when the command can't be run,
127 when it is not found; a container's own status passes through untouched.
"""


class OciboxError(Exception):
    """Any failure ocibox reports to the user: bad input, registry, store."""

    exit_code = 125


class InvalidReference(OciboxError):
    """An image reference that does not follow Docker's grammar."""


class RegistryError(OciboxError):
    """The registry refused, failed or could not be reached."""


class AuthError(RegistryError):
    """Authentication required or denied."""


class NotFound(OciboxError):
    """An image, tag, blob or container that does not exist."""


class IntegrityError(OciboxError):
    """Bytes that do not match their digest or size, or malformed image data."""


class StoreError(OciboxError):
    """The local store can't be read or written (permissions, disk full, lock)."""


class LayerError(OciboxError):
    """A layer that can't be applied safely (path traversal, symlink escape, bad tar)."""


class CommandNotRunnable(OciboxError):
    """The container's command exists but can't be executed."""

    exit_code = 126


class CommandNotFound(OciboxError):
    """The container's command does not exist."""

    exit_code = 127
