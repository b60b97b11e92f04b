"""data_pipeline.splits: car-disjoint and per-image splits, subsets, split.json."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data_pipeline as dp
from tests.data_fixtures import kaggle_dir, own_dir


def fake_pairs(cars=20, angles=16):
    """Pairs of files that need not exist: splits look at names only."""
    return [dp.Pair(Path(f"/d/train/c{c:02d}_{a:02d}.jpg"),
                    Path(f"/d/train_masks/c{c:02d}_{a:02d}_mask.gif"), f"c{c:02d}")
            for c in range(cars) for a in range(1, angles + 1)]


def cars(pairs):
    return {p.car for p in pairs}


def test_car_split_is_disjoint_and_80_20_by_car():
    pairs = fake_pairs()
    train, val = dp.split_pairs(pairs)
    assert not cars(train) & cars(val)
    assert len(cars(val)) == 4 and len(cars(train)) == 16
    assert sorted(train + val, key=lambda p: p.image) == pairs  # nothing lost or doubled
    assert all(sum(p.car == c for p in val) == 16 for c in cars(val))  # whole cars


def test_car_split_is_seeded_and_independent_of_listing_order():
    pairs = fake_pairs()
    train, val = dp.split_pairs(pairs, seed=42)
    assert dp.split_pairs(list(reversed(pairs)), seed=42) == (train, val)
    assert cars(dp.split_pairs(pairs, seed=7)[1]) != cars(val)


def test_val_fraction():
    train, val = dp.split_pairs(fake_pairs(), val_fraction=0.5)
    assert len(cars(val)) == 10 and not cars(train) & cars(val)


def test_random_split_is_per_image_and_seeded():
    pairs = fake_pairs()
    train, val = dp.split_pairs(pairs, method="random", seed=42)
    assert len(val) == round(0.2 * len(pairs)) and len(train) + len(val) == len(pairs)
    assert not {p.image for p in train} & {p.image for p in val}
    assert cars(train) & cars(val)  # the leak a split by car avoids
    assert dp.split_pairs(pairs, method="random", seed=42) == (train, val)
    assert dp.split_pairs(pairs, method="random", seed=1)[1] != val


def test_subset_is_taken_by_car_before_splitting():
    pairs = fake_pairs()
    train, val = dp.split_pairs(pairs, subset=0.5)
    assert len(cars(train + val)) == 10 and len(train + val) == 160  # whole cars
    assert len(cars(val)) == 2 and not cars(train) & cars(val)
    assert dp.split_pairs(pairs, subset=0.5) == (train, val)
    assert cars(dp.subset_by_car(pairs, 0.5, seed=3)) != cars(dp.subset_by_car(pairs, 0.5, seed=4))
    train, val = dp.split_pairs(pairs, method="random", subset=0.25)
    assert len(cars(train + val)) == 5 and len(val) == 16
    assert len(cars(dp.subset_by_car(pairs, 0.33))) == 7  # 6.6 cars, rounded
    # --seed chooses the subset too, not only the split within it.
    assert cars(sum(dp.split_pairs(pairs, subset=0.5, seed=3), [])) != \
        cars(sum(dp.split_pairs(pairs, subset=0.5, seed=4), []))


def test_the_subset_is_the_same_in_every_process():
    """Python salts string hashes per process: a subset drawn from the cars in set
    order would differ between the run and its --resume, or evaluate."""
    script = ("import sys; sys.path.insert(0, '.'); from tests.test_splits import fake_pairs, cars; "
              "import data_pipeline as dp; print(sorted(cars(dp.subset_by_car(fake_pairs(), 0.5, 3))))")
    root = Path(__file__).resolve().parents[1]
    chosen = {subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                             text=True, check=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout
              for h in (1, 2, 3)}
    assert len(chosen) == 1, chosen


def test_two_cars_split_one_each_and_fewer_is_an_error():
    for val_fraction in (0.2, 0.9):  # neither side is ever empty
        train, val = dp.split_pairs(fake_pairs(cars=2), val_fraction=val_fraction)
        assert len(cars(train)) == len(cars(val)) == 1
    with pytest.raises(dp.DataError, match="at least 2 cars, the data has 1"):
        dp.split_pairs(fake_pairs(cars=1))
    with pytest.raises(dp.DataError, match="at least 2 cars"):
        dp.split_pairs(fake_pairs(cars=3), subset=0.2)
    with pytest.raises(dp.DataError, match="at least 2 images"):
        dp.split_pairs(fake_pairs(cars=1, angles=1), method="random")


def test_bad_arguments():
    with pytest.raises(dp.DataError, match="--split 'angle'"):
        dp.split_pairs(fake_pairs(), method="angle")
    for val_fraction in (0.0, 1.0):  # an empty side: nothing to validate or to train on
        with pytest.raises(dp.DataError, match="--val-fraction"):
            dp.split_pairs(fake_pairs(), val_fraction=val_fraction)
    with pytest.raises(dp.DataError, match="--subset"):
        dp.split_pairs(fake_pairs(), subset=0)


def test_own_folders_split_image_by_image(tmp_path):
    train, val = dp.split_pairs(dp.find_pairs(own_dir(tmp_path, n=10)))
    assert len(train) == 8 and len(val) == 2


def patient_pairs(patients=10, slices=6):
    """A user's own folders named <patient>_slice<k>: the stem is each pair's group."""
    return [dp.Pair(Path(f"/d/images/{p}_slice{k:03d}.png"),
                    Path(f"/d/masks/{p}_slice{k:03d}.png"), f"{p}_slice{k:03d}")
            for p in (f"case{i:02d}" for i in range(patients)) for k in range(slices)]


def test_group_by_keeps_each_group_on_one_side_for_split_and_subset():
    pairs = patient_pairs()
    train, val = dp.split_pairs(pairs, group_by=r"^(case\d+)_")
    assert not cars(train) & cars(val)
    assert len(cars(val)) == 2 and len(cars(train)) == 8 and len(val) == 12
    assert {p.image for p in train + val} == {p.image for p in pairs}
    # Without a group in the pattern, the whole match names the group.
    assert dp.split_pairs(pairs, group_by=r"case\d+") == (train, val)
    small_train, small_val = dp.split_pairs(pairs, subset=0.5, group_by="^(case..)")
    assert len(cars(small_train) | cars(small_val)) == 5
    assert len(small_train + small_val) == 30  # whole patients kept
    # Without it, each slice is its own group: patients straddle the split.
    train, val = dp.split_pairs(pairs)
    straddling = {p.car.split("_")[0] for p in train} & {p.car.split("_")[0] for p in val}
    assert straddling


def test_numbered_names_of_a_few_groups_get_the_group_by_they_need(caplog):
    """LGG's per-patient slices flattened into images/: patients straddled the split,
    the validation Dice flattered, without a word."""
    pairs = patient_pairs()
    with caplog.at_level("WARNING"):
        dp.split_pairs(pairs)
    assert ("the image names number images of 10 groups (6 named case00_slice...), but "
            "each image is its own group") in caplog.text
    assert f"pass --group-by '{dp.splits.NUMBERED}'" in caplog.text
    train, val = dp.split_pairs(pairs, group_by=dp.splits.NUMBERED)  # as advised
    assert not cars(train) & cars(val) and len(cars(train) | cars(val)) == 10
    caplog.clear()
    with caplog.at_level("WARNING"):  # names numbering one series, or known groups
        for stems in ([f"img{i}" for i in range(8)], [f"{i:03d}" for i in range(1, 101)],
                      [f"{i}" for i in range(10, 100)],  # their leading digits: no group
                      [f"{breed}_{i}" for breed in ("Abyssinian", "beagle") for i in
                       range(1, 9)]):  # classes, not subjects: a split by image is right
            dp.split_pairs([dp.Pair(Path(f"/d/images/{s}.png"), Path(f"/d/masks/{s}.png"), s)
                            for s in stems])
        dp.split_pairs(fake_pairs())
    assert "number images of" not in caplog.text


def test_group_by_names_an_image_it_finds_no_group_in():
    pairs = patient_pairs() + [dp.Pair(Path("/d/images/scan7.png"),
                                       Path("/d/masks/scan7.png"), "scan7")]
    with pytest.raises(dp.DataError) as e:
        dp.split_pairs(pairs, group_by=r"^(case\d+)_")
    assert "1 of 61 images in /d/images (scan7.png)" in str(e.value)
    assert "\n" not in str(e.value) and r"(case\d+)" in str(e.value)
    shouting = patient_pairs() + [dp.Pair(Path("/d/images/CASE77_slice001.png"),
                                          Path("/d/masks/CASE77_slice001.png"), "x")]
    with pytest.raises(dp.DataError, match=r"\(\?i\) at its start ignores case"):
        dp.split_pairs(shouting, group_by=r"^(case\d+)_")
    # An empty group is no group, and ignoring case would not give one either.
    with pytest.raises(dp.DataError) as e:
        dp.split_pairs(patient_pairs(), group_by=r"^(X?)case")
    assert "finds no group" in str(e.value) and "(?i)" not in str(e.value)
    # Images of several folders (a patient's each): the folder holding them all is named.
    patients = [dp.Pair(Path(f"/d/pat{i}/pat{i}_{j}.tif"), Path(f"/d/pat{i}/pat{i}_{j}_mask.tif"),
                        f"pat{i}") for i in range(2) for j in range(2)]
    with pytest.raises(dp.DataError, match=r"4 of 4 images in /d \(pat0_0.tif, "):
        dp.split_pairs(patients, group_by=r"^(patient\d+)_")
    with pytest.raises(dp.DataError, match="at least 2 groups, the data has 1; .*--group-by "
                                           "a pattern that finds more groups"):
        dp.split_pairs(patient_pairs(), group_by="slice")


def test_split_json_round_trip(tmp_path):
    data = kaggle_dir(tmp_path / "carvana")
    train, val = dp.split_pairs(dp.find_pairs(data))
    split = tmp_path / "run" / "split.json"
    split.parent.mkdir()
    dp.write_split(split, train, val)
    record = json.loads(split.read_text())
    assert record == {"train": [str(p.image) for p in train],
                      "validation": [str(p.image) for p in val]}
    assert dp.read_split(split) == (train, val)
    assert not list(split.parent.glob("*.tmp"))


def test_read_split_finds_moved_data_and_names_what_is_missing(tmp_path):
    data = kaggle_dir(tmp_path / "carvana")
    train, val = dp.split_pairs(dp.find_pairs(data))
    dp.write_split(tmp_path / "split.json", train, val)
    moved = tmp_path / "elsewhere"
    shutil.move(data, moved)
    with pytest.raises(dp.DataError, match=f"{train[0].image.name}.*20 missing"):
        dp.read_split(tmp_path / "split.json")
    train2, val2 = dp.read_split(tmp_path / "split.json", data_dir=moved)
    assert [p.image.name for p in val2] == [p.image.name for p in val]
    assert all(p.image.parent == moved / "train" and p.mask.is_file() for p in train2 + val2)
    (moved / "train" / train[0].image.name).unlink()
    with pytest.raises(dp.DataError, match=f"{train[0].image.name}.*1 missing"):
        dp.read_split(tmp_path / "split.json", data_dir=moved)


def test_read_split_of_a_foreign_file(tmp_path):
    (tmp_path / "split.json").write_text('{"train": []}')
    with pytest.raises(dp.DataError, match="not a split file"):
        dp.read_split(tmp_path / "split.json")


def test_a_split_file_is_read_with_one_listing_of_its_dataset(tmp_path, monkeypatch):
    """Each recorded image had listed (and paired) the whole dataset again to find
    itself: a Carvana split, 5,088 listings of 5,088 files, at every resume."""
    from data_pipeline import files

    data = own_dir(tmp_path / "own", n=6)
    train, val = dp.split_pairs(dp.find_pairs(data), method="random", val_fraction=0.5)
    dp.write_split(tmp_path / "split.json", train, val, data)
    calls = []
    match_pairs = files.match_pairs
    monkeypatch.setattr(files, "match_pairs", lambda *a, **k: (calls.append(a),
                                                               match_pairs(*a, **k))[1])
    assert dp.read_split(tmp_path / "split.json") == (train, val)
    assert len(calls) == 1
    calls.clear()
    assert dp.read_split(tmp_path / "split.json", data) == (train, val)  # "moved" there
    assert len(calls) == 1
