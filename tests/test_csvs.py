import pytest

from pack.csvs import class_list, read_clips


def write(tmp_path, text):
    path = tmp_path / "k.csv"
    path.write_text(text)
    return path


def test_kinetics_rows_with_quoted_labels(tmp_path):
    clips = read_clips(write(tmp_path, 'label,youtube_id,time_start,time_end,split,is_cc\n'
                                       'abseiling,0wR5jVB-WPk,417,427,val,0\n'
                                       '"passing American football (in game)",--nQbRBEz2s,4,14,val,0\n'
                                       '"air drumming",2cPLjY5AWXU,1,11,val,0\n'))
    assert [c.label for c in clips] == ["abseiling", "passing American football (in game)", "air drumming"]
    assert clips[1].video_id == "--nQbRBEz2s_000004_000014"
    assert clips[0].split == "val"
    assert class_list(clips) == ["abseiling", "air drumming", "passing American football (in game)"]


def test_test_csv_has_no_label(tmp_path):
    clips = read_clips(write(tmp_path, "youtube_id,time_start,time_end,split\n--6bJUbfpnQ,17,27,test\n"))
    assert clips[0].label is None and clips[0].split == "test"
    assert clips[0].video_id == "--6bJUbfpnQ_000017_000027"
    assert class_list(clips) == []


def test_kinetics700_validate_split_is_val(tmp_path):
    clips = read_clips(write(tmp_path, "label,youtube_id,time_start,time_end,split\nx,abc,0,10,validate\n"))
    assert clips[0].split == "val"
    from pack.__main__ import choose_split

    assert choose_split(clips, "validate", tmp_path / "k.csv") == choose_split(clips, None, tmp_path / "k.csv") == "val"


def test_given_class_order_is_kept_and_unknown_labels_refused(tmp_path):
    clips = read_clips(write(tmp_path, "label,youtube_id,time_start,time_end,split\nb,x,0,10,train\na,y,0,10,train\n"))
    assert class_list(clips, ["b", "a", "c"]) == ["b", "a", "c"]
    with pytest.raises(ValueError, match="not in the class list"):
        class_list(clips, ["a"])


def test_not_a_kinetics_csv(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        read_clips(write(tmp_path, "name,url\na,b\n"))
