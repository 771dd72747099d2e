import pytest

from pack.annotations import AnnotationError, class_list, read_kinetics


def read_clips(path):
    return [c for clips in read_kinetics(path).splits.values() for c in clips]


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

    splits = list(read_kinetics(tmp_path / "k.csv").splits)
    assert choose_split(splits, "validate", tmp_path / "k.csv") == choose_split(splits, None, tmp_path / "k.csv") == "val"


def test_given_class_order_is_kept_and_unknown_labels_refused(tmp_path):
    clips = read_clips(write(tmp_path, "label,youtube_id,time_start,time_end,split\nb,x,0,10,train\na,y,0,10,train\n"))
    assert class_list(clips, ["b", "a", "c"]) == ["b", "a", "c"]
    with pytest.raises(ValueError, match="not in the class list"):
        class_list(clips, ["a"])


def test_not_a_kinetics_csv(tmp_path):
    with pytest.raises(AnnotationError, match="missing column"):
        read_clips(write(tmp_path, "name,url\na,b\n"))


HEADER = "label,youtube_id,time_start,time_end,split\n"


def test_a_spreadsheets_byte_order_mark_is_read_and_a_label_like_header_warned(tmp_path, capsys):
    path = tmp_path / "k.csv"
    path.write_bytes("\ufeff".encode() + (HEADER + "abseiling,abc,0,10,train\n").encode())
    assert [c.label for c in read_clips(path)] == ["abseiling"]
    path.write_text("Label,youtube_id,time_start,time_end,split\nabseiling,abc,0,10,train\n")
    assert [c.label for c in read_clips(path)] == [None]
    assert "no 'label' column" in capsys.readouterr().out


@pytest.mark.parametrize("text, line, match", [
    (HEADER + "a,abc,0,10,train\nb,def,0\n", 3, "fewer fields"),
    (HEADER + "a,abc,inf,10,train\n", 2, "time_start 'inf' is not a number"),
    (HEADER + "a,abc,0,ten,train\n", 2, "time_end 'ten'"),
    (HEADER + "a,abc,0,10,train\n,def,0,10,train\n", 3, "empty label"),
    (HEADER + '"two\nlines",abc,0,10,train\n', 3, "line break"),
    (HEADER + "passing American football, in game,abc,0,10,train\n", 2, "more fields"),
])
def test_every_csv_error_names_the_file_and_line(tmp_path, text, line, match):
    path = write(tmp_path, text)
    with pytest.raises(AnnotationError, match=f"{path}:{line}: .*{match}"):
        read_clips(path)


def test_a_latin1_file_names_its_line(tmp_path):
    path = tmp_path / "k.csv"
    path.write_bytes((HEADER + "a,abc,0,10,train\n").encode() + "caf\u00e9,def,0,10,train\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=f"{path}:3: not UTF-8 text .*save it as UTF-8"):
        read_clips(path)


def test_repeated_rows_and_conflicting_labels(tmp_path, capsys):
    from pack.annotations import deduplicated

    same = read_clips(write(tmp_path, HEADER + "a,abc,0,10,train\nb,xyz,0,10,train\na,abc,0,10,train\n"))
    assert [c.video_id for c in deduplicated(same)] == ["abc_000000_000010", "xyz_000000_000010"]
    assert "1 line(s) repeat an earlier one" in capsys.readouterr().out
    other = read_clips(write(tmp_path, HEADER + "a,abc,0,10,train\nb,abc,0,10,train\n"))
    with pytest.raises(AnnotationError, match=r"k.csv:3: abc_000000_000010 is listed again with another label \('b'; "
                                              r".*k.csv:2 says 'a'\)"):
        deduplicated(other)


def test_labels_that_differ_only_in_unicode_form_are_one_class(tmp_path):
    """"café" typed on macOS is decomposed (e + a combining accent), as its file names are; elsewhere composed. Seen
    apart they would be two classes that look alike in every table: they are one (the composed form), and a class
    list naming both names one class twice."""
    import unicodedata

    from pack.annotations import read_class_file, read_folders

    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    clips = read_clips(write(tmp_path, f"label,youtube_id,time_start,time_end,split\n{composed},a,0,10,val\n"
                                       f"{decomposed},b,0,10,val\n"))
    assert class_list(clips) == [composed]
    for name, video in ((composed, "x.mp4"), (decomposed, "y.mp4")):
        (tmp_path / "folders" / name).mkdir(parents=True)
        (tmp_path / "folders" / name / video).write_bytes(b"")
    folders = read_folders(tmp_path / "folders", "train")
    assert folders.classes == [composed] and {c.label for c in folders.splits["train"]} == {composed}
    (tmp_path / "classes.txt").write_text(f"{composed}\n{decomposed}\n")
    with pytest.raises(AnnotationError, match="named twice"):
        read_class_file(tmp_path / "classes.txt")
