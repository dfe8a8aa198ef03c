"""Names and numbers of the shared test store (built in ``conftest.py``), for every test module.

Import as ``from constants import TEST_KEY, JOB_UNIFORM`` (pytest puts ``tests/`` on
``sys.path``).
"""

from __future__ import annotations

# API keys of the test servers: key -> owner.
TEST_KEY = "test-key"
OTHER_KEY = "other-key"
TEST_OWNER = "default"
OTHER_OWNER = "other"
TEST_KEYS = {TEST_KEY: TEST_OWNER, OTHER_KEY: OTHER_OWNER}

# job_uniform: one image size, jpg and png mixed, several chunks (the last one short).
JOB_UNIFORM = "job_uniform"
UNIFORM_LABELS = ("bird", "cat", "dog")
UNIFORM_PER_LABEL = 20
UNIFORM_SIZE = (32, 48)  # (H, W)
UNIFORM_FORMATS = ("jpg", "png")
UNIFORM_CHUNK_SIZE = 16
UNIFORM_TOTAL = UNIFORM_PER_LABEL * len(UNIFORM_LABELS)  # 60 images -> 4 chunks

# job_mixed: every format and colour mode the packer accepts, mixed sizes, a nested label.
JOB_MIXED = "job_mixed"
MIXED_LABELS = ("animals/cat", "bird", "cat", "dog")
MIXED_CHUNK_SIZE = 10
MIXED_TOTAL = 24  # 3 chunks: 10, 10, 4
# A JPEG stored 20 high x 30 wide with EXIF orientation 6: displayed 30 high x 20 wide.
EXIF_ROTATED_ID = "animals/cat/rotated.jpg"
EXIF_ROTATED_STORED_SIZE = (20, 30)  # (H, W) of the pixels in the file
EXIF_ROTATED_DISPLAY_SIZE = (30, 20)  # (H, W) after ImageOps.exif_transpose

# Jobs that are not completed: (job id, status, progress), all owned by TEST_OWNER.
UNFINISHED_JOBS = (
    ("job_pending", "pending", 0),
    ("job_running", "running", 42.5),
    ("job_failed", "failed", 63),
    ("job_cancelled", "cancelled", 10),
)

# A completed job of OTHER_OWNER: invisible (404, unlisted) to TEST_KEY.
JOB_OTHER = "job_other"
OTHER_TOTAL = 4

# The lines of `pixcrawler info`, as the spec shows them.
INFO_FIELDS = ("Dataset", "Status", "Images", "Chunks", "Size", "Created", "Labels")
