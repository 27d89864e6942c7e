import pytest

from curators import label_set, select_classes


def test_label_set_is_imagenet_1k():
    classes = label_set()
    assert len(classes) == 1000
    assert [c.index for c in classes] == list(range(1000))
    wnids = [c.wnid for c in classes]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    tench, goldfish = classes[0], classes[1]
    assert tench.wnid == "n01440764" and "Tinca tinca" in tench.lemmas
    assert goldfish.name == "goldfish" and "Carassius auratus" in goldfish.lemmas
    assert "aquarium" in goldfish.gloss
    # Every hypernym chain climbs to WordNet's root, 'entity'.
    assert all(c.hypernyms and c.hypernyms[-1] == "n00001740" for c in classes)


def test_select_classes():
    assert [c.index for c in select_classes(first=3)] == [0, 1, 2]
    picked = select_classes(wnids=["n07753592", "n01443537"])
    assert [c.name for c in picked] == ["goldfish", "banana"]  # class-index order
    with pytest.raises(KeyError):
        select_classes(wnids=["n99999999"])
