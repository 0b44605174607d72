"""The record type: one writer, one reader, a schema version; records from before the schema still read."""
import json

import pytest

from uge.errors import DataError
from uge.records import SCHEMA_VERSION, Record, read_record, write_record

LEGACY = {  # a record as stop 3 wrote it: no schema_version, no train_seed, no countermeasures
    "data": "clean", "n_train": 100, "n_test": 50, "recipe": {"epochs": 2}, "device": "cpu", "versions": {},
    "role": "hacker", "arch": "cnn", "mode": "normal", "init": "seed:1", "test_acc": 41.5, "train_acc": 60.0,
    "seconds": 1.5}


def test_a_legacy_record_reads_and_writes_back_with_its_fields(tmp_path):
    f = tmp_path / "old.json"
    f.write_text(json.dumps(LEGACY))
    rec = read_record(f)
    assert rec.test_acc == 41.5 and rec.train_seed is None and rec.schema_version == SCHEMA_VERSION
    write_record(tmp_path / "new.json", rec)
    back = json.loads((tmp_path / "new.json").read_text())
    assert back == {**LEGACY, "countermeasures": None, "schema_version": SCHEMA_VERSION}


@pytest.mark.parametrize("change, message", [
    ({"tset_acc": 1.0}, "unknown field"), ({"test_acc": None, "arch": None}, None),
    ({"schema_version": SCHEMA_VERSION + 1}, "schema version")])
def test_a_bad_record_is_a_data_error(tmp_path, change, message):
    d = {**LEGACY, **change}
    if message is None:  # a missing required field
        d = {k: v for k, v in d.items() if k not in change}
        message = "missing field.*arch.*test_acc"
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(d))
    with pytest.raises(DataError, match=message):
        read_record(f)


def test_defaults_stay_out_of_the_file():
    d = Record(**LEGACY).to_dict()
    for k in ("fresh", "index", "curve", "repeat", "variant", "published"):
        assert k not in d
    assert Record(**LEGACY, fresh=True, index=0).to_dict()["fresh"] is True


def test_a_network_that_failed_to_train_is_marked_not_read_as_protection():
    """issue 21: the demo's distilled LeNet that collapsed (train and test at chance) read as −82.78 points of
    protection; a network that fits its training data but not the test set is the protection's doing."""
    from uge.evaluate import failed_to_train, format_table

    def rec(data, arch, test, train):
        return {"role": "hacker", "arch": arch, "mode": "distill", "init": "seed:1", "data": data,
                "test_acc": test, "train_acc": train}

    records = [rec("clean", "lenet", 92.5, 95.0), rec("protected", "lenet", 9.72, 10.1),
               rec("clean", "cnn", 99.0, 100.0), rec("protected", "cnn", 12.0, 99.0)]
    assert failed_to_train(records[1], 10) and not failed_to_train(records[3], 10)
    table = format_table(records, num_classes=10)
    assert "| lenet | distill | seed:1 | 92.50 | 9.72 (failed to train) | – |" in table
    assert "| cnn | distill | seed:1 | 99.00 | 12.00 | -87.00 |" in table
    assert "failed" not in format_table(records)  # without the number of classes nothing is judged
