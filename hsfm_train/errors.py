"""Exception types. Every error names the file, key or value at fault and what was expected."""


class HsfmError(Exception):
    """Base class for errors raised on purpose by hsfm-train."""


class DataFormatError(HsfmError, ValueError):
    """A scene file, shard or sample is malformed (wrong shape, dtype, band count, missing key...)."""


class UnsafeDataError(HsfmError):
    """Data that would need unpickling (or another code-executing decoder) was refused."""


class DataQualityError(HsfmError):
    """Too many bad samples were skipped: the configured failure fraction was exceeded."""


class ConfigError(HsfmError, ValueError):
    """A configuration key or value is unknown or impossible."""
