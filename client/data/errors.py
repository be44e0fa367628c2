"""Why a file or report was not used: one exception type and the fixed set of reason codes.

Reason codes are stable snake_case words: they are JSON keys in `client.data index --json`
output and values in the catalog, so add new ones here and never rename an existing one.
"""

REASON_CODES = {
    "file_not_found": "the path does not exist or is not readable",
    "empty_file": "the file has zero bytes",
    "truncated_file": "the file ends before its header or pixel data is complete",
    "not_dicom": "the file is neither a DICOM file nor a supported image format",
    "not_an_image": "the DICOM object carries no pixel data (e.g. a structured report)",
    "unsupported_multiframe": "the DICOM object holds more than one frame",
    "unsupported_photometric": "colour or palette images are not chest radiographs we can use",
    "undecodable_pixels": "the pixel data could not be decoded (corrupt codestream or missing codec)",
    "too_large": "the image has more pixels than the configured limit; refused before decoding",
    "blank_image": "the decoded image has a single constant value",
    "unreadable_text": "the report file cannot be read or decoded as text",
    "empty_report": "the report has no text",
    "no_report": "the study has no report file",
    "report_too_large": "the report file is larger than the configured limit",
    "no_sections": "the report has neither a FINDINGS nor an IMPRESSION section nor usable free text",
    "filtered_view": "the image's view position is outside the configured view filter",
    "unreadable_path": "the path cannot be opened (permissions, a symlink loop, an odd name)",
    "not_a_regular_file": "the path is a folder, a named pipe, a device or a socket: only regular files are read",
    "outside_root": "the path resolves outside the data root ('..', an absolute path, or a symlink leading out); "
                    "allowed only with --allow-outside-root",
    "nul_bytes": "a NUL byte in a CSV row, a path or a report: a binary or corrupted file, not text",
    "bad_manifest_row": "a row of the manifest or of a layout's CSV table that cannot be used (a field over the "
                        "size limit, a missing required value, unparseable boxes); the detail names file and line",
    "conflicting_study": "rows for one study id disagree on the patient, the split or the labels: the study is "
                         "left out rather than merged",
    "no_longer_listed": "indexed by an earlier run, but the data no longer lists it (a removed row, or one now "
                        "left out): not used until it is listed again",
    "internal_error": "an unexpected error while reading the file or report (a bug: see the detail and report it)",
}

# Data warnings: not a file refused, but something in the layout's lists an operator should see.
# Stored in the catalog (`data_warnings`) with the row rejections above, listed by `client.data summary`.
WARNING_CODES = {
    "duplicate_image": "an image id is listed more than once; the first entry is kept",
    "study_without_images": "a study whose every image is listed under another study; it is left out",
}


class Rejected(Exception):
    """A file or report that cannot be used, with a reason code and a human-readable detail."""

    def __init__(self, code: str, detail: str = ""):
        if code not in REASON_CODES:
            raise ValueError(f"unknown rejection reason code {code!r}; add it to REASON_CODES")
        self.code = code
        self.detail = detail or REASON_CODES[code]
        super().__init__(f"{code}: {self.detail}")
