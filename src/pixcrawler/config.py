"""Every tunable and environment variable of the SDK, in one place."""

from __future__ import annotations

# Environment variables.
ENV_API_KEY = "PIXCRAWLER_API_KEY"
ENV_BASE_URL = "PIXCRAWLER_BASE_URL"
ENV_CACHE_DIR = "PIXCRAWLER_CACHE_DIR"
ENV_CONFIG_DIR = "PIXCRAWLER_CONFIG_DIR"
ENV_SERVER_KEYS = "PIXCRAWLER_SERVER_KEYS"

# The API.
DEFAULT_BASE_URL = "https://api.pixcrawler.com"
API_PREFIX = "/api/v1"
USER_AGENT = "pixcrawler-sdk"
DEFAULT_MAX_WORKERS = 4
DEFAULT_TIMEOUT = 300.0
DEFAULT_PAGE_SIZE = 50

# Retries: "3 retries" is up to 4 attempts, exponential backoff with full jitter.
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_BASE = 0.5  # seconds; after n failures, uniform(0, min(cap, base * 2**(n-1)))
DEFAULT_BACKOFF_MAX = 30.0
MAX_RETRY_AFTER = 60.0  # a longer Retry-After is raised to the caller, not slept
MAX_ERROR_MESSAGE = 300  # characters of a server's error message kept in an exception
MIN_REDACTED_KEY = 4  # a shorter "key" would garble every message it was scrubbed from
MAX_ERROR_BODY = 64 << 10  # bytes of a streamed error response read for its message
MAX_API_ANSWER = 64 << 20  # bytes of an API call's JSON answer (a job lists chunks)
RETRY_STATUSES = frozenset({429, *range(500, 600)})  # DESIGN.md: 429 and every 5xx
URL_EXPIRED_STATUSES = frozenset({403, 410})

# The downloader.
DEFAULT_PREFETCH = 2
# Bytes per read. 1 MiB reads cost ~10% less receive CPU (~1% of an iteration) but left
# glibc's arenas ~4 MiB bigger and peak RSS less steady.
READ_BLOCK = 256 << 10
MIN_RANGE_PART = 8 << 20  # a chunk is split into parallel ranges only above 2 x this
# The most bytes a chunk held in memory may have (500 images of 16 MiB): a job listing more
# for one (a bad size_bytes, 10**15) or a body running past it (a chunk listed without a
# size) fails that chunk instead of asking malloc for it.
MAX_CHUNK_BYTES = 8 << 30
# A consumer kept waiting this long for one chunk logs what holds it up, and again after
# each further stretch as long. Retries are logged as they happen.
SLOW_WAIT_SECONDS = 10.0
PROGRESS_REFRESH_SECONDS = 0.5  # a progress bar's bytes and skips, shown while it waits

# Archive guards.
MAX_MEMBERS = 100_000
MAX_MEMBER_BYTES = 512 << 20
MAX_MANIFEST_BYTES = 64 << 20
MANIFEST_BASE_BYTES = 1 << 20  # and a manifest at most this plus so much per member
MANIFEST_BYTES_PER_MEMBER = 16 << 10
MAX_IMAGE_PIXELS = 178_956_970  # Pillow's own default decompression-bomb limit
# A progressive JPEG decodes every scan over the whole image: a small file of a thousand
# repeated scans took seconds. Real ones have about 10 (nvImageCodec refuses past 256).
MAX_JPEG_SCANS = 256

# Every thread the SDK starts is named so: the exit hook (downloader) tells them by it.
THREAD_PREFIX = "pixcrawler-"

# Decoding.
DEFAULT_DECODE_THREADS = 2
DECODE_GROUP = 16  # images per decode task (one future per image costs ~60 us)
DECODE_RAMP = (2, 4, 8)  # an iteration's first groups: the first image waits for 2 decodes
DECODE_GROUPS_IN_FLIGHT = 4  # decoded images held ahead = this x DECODE_GROUP
# ...and by bytes, where the manifest lists the images' sizes: a group ends before it would
# decode to more than DECODE_GROUP_BYTES (one image at least), and groups in flight stop at
# DECODE_AHEAD_BYTES (one per decode thread at least). 64 twelve-megapixel photos held
# ahead were 2.3 GB; 16 photos of a few hundred pixels a side stay one group.
DECODE_GROUP_BYTES = 16 << 20
DECODE_AHEAD_BYTES = 64 << 20
IMAGE_BUFFERS = 96  # reusable decode outputs: the lookahead, or a batch of 64, and slack
SUPPORTED_MODES = ("RGB", "L", "RGBA")
ON_ERROR_POLICIES = ("raise", "skip", "warn")

# `pixcrawler download`.
IMAGES_LISTING = "metadata.jsonl"  # the images format's listing, atop the job's folder
MAX_NAME_BYTES = 255  # a file name on the common file systems (ext4, XFS, APFS, NTFS)
MAX_PATH_BYTES = 4095  # a whole path: Linux's PATH_MAX, less its NUL (macOS allows 1,023)

# The packer.
DEFAULT_CHUNK_SIZE = 500
# A job.json lists chunks, not images: some 200 KB per thousand chunks. The reference
# server takes a larger one as "not there", as a malformed one, rather than read it whole
# into memory on every change; the packer refuses to write one. (The answer adds each
# chunk's URL: get_job checks it against MAX_API_ANSWER, which a job.json this size stays
# under.)
MAX_JOB_BYTES = 32 << 20
DEFAULT_OWNER = "default"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
JOB_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
SHA256_PATTERN = r"[0-9a-fA-F]{64}"  # a chunk's or an image's, as the API lists it

# The map-style torch cache and the streaming dataset.
DEFAULT_SHUFFLE_BUFFER = 500  # decoded images a streaming worker holds to shuffle across chunks
DEFAULT_MEMORY_CACHE_BYTES = 1 << 30
CACHE_SUBDIR = "chunks"  # <cache root>/chunks/<job id>/<index>-<sha256>.zip
STALE_TEMP_SECONDS = 24 * 3600  # a temp file this old was left by a process that died
# The longest a chunk's cache lock held by another process (downloading it, or stopped
# with Ctrl-Z or in a debugger) is waited for; then this one downloads it too. Longer than
# a download may take with the defaults (4 attempts of up to 300 s of silence each), so a
# slow but live download is not fetched twice.
CACHE_LOCK_WAIT_SECONDS = 1800.0
# Before Python 3.13 each mapped cached chunk holds a descriptor: a store keeps at most this
# share of the process's descriptor limit mapped (at least MIN; UNLIMITED where it has none).
MAPPED_FILES_SHARE = 1 / 4
MIN_MAPPED_FILES = 4
MAPPED_FILES_UNLIMITED = 4096
