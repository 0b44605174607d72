"""Issue 21: ``uge demo``'s one table and figure, end to end at tiny sizes; its table never reads a failed
network as protection."""
from __future__ import annotations


def test_the_demo_runs_end_to_end_and_writes_its_table_and_figure(tmp_path):
    from uge.demo import TINY, run_demo

    table, seconds = run_demo(tmp_path, device="cpu", progress=False, sizes=TINY)
    report = (tmp_path / "report.md").read_text()
    assert table in report and "demo.png" in report and (tmp_path / "demo.png").stat().st_size > 1000
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 4 and "grating (the default" in rows[2] and "sealed" in rows[2] and "UGE" in rows[3]
    assert "unsealed originals, bit for bit" in rows[2]
    assert all(cm in rows[0] for cm in ("grayscale+jpeg:quality=10", "blockdct:k=192,ratio=0.95", "knownbasis"))
    assert "two seeds" in table and seconds > 0
    # clean: 2 plain + 3 attacked; the default: 1 + 3 (its key holder is the clean one); UGE: 2 + 3
    assert len(list((tmp_path / "records").glob("*.json"))) == 14


def _rec(role, acc, train_acc=90.0, data="clean", cms=None):
    return {"role": role, "test_acc": acc, "train_acc": train_acc, "data": data, "countermeasures": cms}


def test_the_demo_table_marks_a_network_that_failed_to_train_and_gives_it_no_change():
    from uge.demo import format_demo_table

    cm = "grayscale+jpeg:quality=10"
    rows = {"clean": [_rec("authorized", 80.0, data="unsealed"), _rec("hacker", 78.0), _rec("hacker", 60.0, cms=cm)],
            "patch": [_rec("authorized", 80.0, data="unsealed"), _rec("hacker", 20.0, data="patch"),
                      _rec("hacker", 50.0, data="patch", cms=cm)],
            "uge": [_rec("authorized", 75.0, data="uge"), _rec("hacker", 10.0, train_acc=11.0, data="uge"),
                    _rec("hacker", 70.0, data="uge", cms=cm)]}
    lines = format_demo_table(rows, 10, (cm,)).splitlines()
    assert "20.0 (-58.0)" in lines[3] and "50.0 (-28.0)" in lines[3] and "80.0 (+0.0)" in lines[3]
    assert "10.0 (failed to train: not protection) |" in lines[4] and "75.0 (-5.0)" in lines[4]
    assert "80.0 and 78.0 (2.0 points apart)" in lines[-1]


def test_the_worst_case_reads_records_of_every_countermeasure_named_by_any_spelling():
    """Records hold a countermeasure's canonical text (every parameter); the demo names them short."""
    from uge.demo import format_demo_table

    cms = ("grayscale+jpeg:quality=10", "knownbasis")
    rows = {"clean": [_rec("authorized", 80.0, data="unsealed"), _rec("hacker", 78.0),
                      _rec("hacker", 60.0, cms=cms[0]), _rec("hacker", 65.0, cms="knownbasis:bases=10,dct=0")],
            "default": [_rec("authorized", 80.0, data="unsealed"), _rec("hacker", 20.0, data="p"),
                        _rec("hacker", 30.0, data="p", cms=cms[0]),
                        _rec("hacker", 55.0, data="p", cms="knownbasis:bases=10,dct=0")]}
    lines = format_demo_table(rows, 10, cms).splitlines()
    assert "65.0 by `knownbasis:bases=10,dct=0`" in lines[2]
    assert "55.0 by `knownbasis:bases=10,dct=0` (-23.0)" in lines[3]


def test_no_change_is_given_against_a_clean_network_that_failed_to_train():
    from uge.demo import format_demo_table

    cm = "grayscale+jpeg:quality=10"
    rows = {"clean": [_rec("authorized", 80.0, data="unsealed"), _rec("hacker", 9.0, train_acc=10.0),
                      _rec("hacker", 60.0, cms=cm)],
            "patch": [_rec("authorized", 80.0, data="unsealed"), _rec("hacker", 20.0, data="patch"),
                      _rec("hacker", 50.0, data="patch", cms=cm)]}
    lines = format_demo_table(rows, 10, (cm,)).splitlines()
    assert "| 20.0 | 50.0 |" in lines[3] and "80.0 (+0.0)" in lines[3]
