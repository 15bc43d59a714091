"""The committed stubs match protos/, and the check notices a stub that drifted."""

from __future__ import annotations

import shutil

from serving import protogen


def test_committed_stubs_are_up_to_date():
    assert protogen.main(["--check"]) == 0


def test_check_reports_a_drifted_stub_and_imports_are_package_relative(tmp_path):
    generated = tmp_path / "generated"
    protogen.generate(generated)
    grpc_stub = (generated / "rnnlab" / "v1" / "generation_pb2_grpc.py").read_text()
    assert "from serving.api.rnnlab.v1 import generation_pb2" in grpc_stub
    committed = tmp_path / "committed"
    shutil.copytree(generated, committed)
    (committed / "rnnlab" / "v1" / "translation_pb2.pyi").write_text("# edited by hand\n")
    (committed / "rnnlab" / "extra_pb2.py").write_text("")
    assert protogen.differences(generated, committed) == [
        "extra rnnlab/extra_pb2.py",
        "differs rnnlab/v1/translation_pb2.pyi",
    ]
