"""Exception types raised at the library's boundaries. Each message names the bad value and the expectation."""

# What goes wrong, and what it is called: the wording of a failure changes no result. Which class
# derives from which can (`except UnusableImage` leaves an image out), so a class named by counted
# code counts by its bases, never by its body (see pipeline.fingerprint).
AFFECTS_RESULTS = False


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A parameter has a value the pipeline cannot use."""


class DownloadError(PipelineError):
    """A source could not be fetched: unreachable, missing, or not what was expected."""


class ChecksumMismatch(DownloadError):
    """Fetched bytes do not have the expected sha256."""


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the target folder, or is not a plain file or folder."""


class DatasetError(PipelineError):
    """The images or TFRecords on disk do not form a usable dataset."""


class UnusableImage(DatasetError):
    """One file cannot be used as an image: not an image, truncated, or a decompression bomb.

    Conversion lists such files as bad and prediction skips them; the message starts with the
    underlying error's type (e.g. "DecompressionBombError: ...")."""


class CorruptShard(DatasetError):
    """A TFRecord shard is missing or does not have the sha256 its dataset's metadata records."""

    def __init__(self, message: str, shard: str):
        super().__init__(message)
        self.shard = shard


class ModelDefinitionError(PipelineError):
    """A model file is missing, or does not follow the model-file contract."""


class StageOutputError(PipelineError):
    """A stage finished without producing what it promises."""


class MissingBucket(PipelineError):
    """An S3 location names a bucket that the S3 server does not have: a set-up mistake."""


class LockLost(PipelineError):
    """An S3 lock's lease ended while its holder was still inside: taken over, deleted, or not
    renewed in time. The holder stops before it writes anything more."""


class RefusedURL(DownloadError):
    """A URL the download may not fetch, whatever it holds: a local file named by a remote manifest,
    a link-local or cloud-metadata address, or a private address named from a public one."""


class SizeCapExceeded(DownloadError):
    """A fetch passed its byte cap: one manifest image's, or the whole download's."""


class ChampionError(PipelineError):
    """A champion pointer that cannot be used as asked: damaged, or no champion where one is needed."""


class NoChampion(ChampionError):
    """No model is champion of a dataset version and split that one was asked of."""


class LineageError(PipelineError, LookupError):
    """A lineage query names no version of the index: no version starts with the id given, several
    do, or no output contains the path given."""


class NotBlessed(PipelineError):
    """A model was required to be blessed, and its verdict does not bless it."""
