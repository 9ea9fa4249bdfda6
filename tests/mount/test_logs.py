"""--log-format json and --log-level, through a real mount."""

from __future__ import annotations

import errno
import json
import os

import pytest
from mounts import mounted

pytestmark = pytest.mark.lxd


def test_json_lines_parse_and_carry_the_fields(sandbox, images, tmp_path):
    fp = images.fps["gz"]
    with mounted(sandbox, tmp_path / "mnt", "--log-format", "json", "--log-level", "debug") as m:
        with pytest.raises(OSError) as refused:  # one file of an image is never removed
            os.unlink(m.path / "by-fingerprint" / fp / "metadata.json")
        assert refused.value.errno == errno.EPERM
        with pytest.raises(FileNotFoundError):
            os.stat(m.path / "by-fingerprint" / ("0" * 64))
        lines = [json.loads(line) for line in m.log_text().splitlines()]  # every line is one object
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert {line["level"] for line in lines} >= {"debug", "info"}
    refusal = [line for line in lines if line.get("operation") == "unlink" and line.get("fingerprint") == fp]
    assert refusal, [line for line in lines if "operation" in line]
    assert refusal[0]["errno"] == errno.errorcode[refused.value.errno]
    assert refusal[0]["remote"] == f"unix://{sandbox.socket}"  # --socket PATH names it so
    missing = [line for line in lines if line.get("operation") == "getattr" and line.get("errno") == "ENOENT"]
    assert missing and missing[0]["fingerprint"] == "0" * 64


def test_log_level_warning_leaves_out_info(sandbox, images, tmp_path):
    with mounted(sandbox, tmp_path / "mnt", "--log-level", "warning") as m:
        os.listdir(m.path / "by-fingerprint")
        with pytest.raises(PermissionError):
            os.unlink(m.path / "by-fingerprint" / images.fps["gz"] / "metadata.json")
        text = m.log_text()
    assert " DEBUG " not in text and " INFO " not in text
    assert " WARNING " in text
