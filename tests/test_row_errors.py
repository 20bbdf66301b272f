"""Error reason codes: every prefix the image loader writes maps to a code, and only storage or
network conditions count as transient."""

import pyarrow as pa
import pytest

from mltag.table.row_errors import REASONS, TRANSIENT, error_reason, is_transient, reason_column, transient_mask


@pytest.mark.parametrize(
    "error, reason, transient",
    [
        ("missing: s3://b/x.jpg does not exist", "missing", True),
        ("permission denied: s3://b/x.jpg", "permission_denied", True),
        ("fetch failed after 3 attempts: s3://b/x.jpg: 503", "fetch_failed", True),
        ("timeout: no answer from s3://b/x.jpg within 30 s", "timeout", True),
        ("refused uri: scheme 'http' is not in allowed_schemes [file, s3]", "refused_uri", False),
        ("too many pixels: 9000x9000 is over the limit", "too_many_pixels", False),
        ("not an image: no decoder recognises these bytes", "not_an_image", False),
        ("unsupported format: EPS", "unsupported_format", False),
        ("corrupt image: broken data stream", "corrupt_image", False),
        ("empty file: /x.jpg has zero bytes", "empty_file", False),
        ("something nobody foresaw", "unexpected", True),
        (None, None, False),
    ],
)
def test_reason_and_transience(error, reason, transient):
    assert error_reason(error) == reason
    assert is_transient(reason) is transient


def test_column_helpers_agree_with_the_row_function():
    errors = pa.array([None, "timeout: x", "corrupt image: y", "missing: z"])
    reasons = reason_column(errors)
    assert reasons.to_pylist() == [None, "timeout", "corrupt_image", "missing"]
    assert transient_mask(reasons).tolist() == [False, True, False, True]
    assert TRANSIENT <= set(REASONS)
