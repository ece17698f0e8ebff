"""The local stack's logs survive and stay bounded (issue 26): a restart rotates them (test_broker checks that the
previous run's are kept), and a log that outgrows its limit while its process still writes is rotated in place."""
from devstack.stack import rotate_log


def test_a_log_in_use_is_rotated_in_place_and_only_the_newest_are_kept(tmp_path):
    path = tmp_path / "chalice.log"
    with open(path, "ab", buffering=0) as writer:  # as the child holds it: appending
        for run in range(1, 5):
            writer.write(f"part {run}\n".encode())
            rotate_log(path, keep=2, in_use=True)
        writer.write(b"part 5\n")  # the writer goes on at the start of the emptied file
    assert path.read_text() == "part 5\n"
    assert [(path.with_name(f"chalice.log.{n}")).read_text() for n in (1, 2)] == ["part 4\n", "part 3\n"]
    assert not path.with_name("chalice.log.3").exists()


def test_a_restart_renames_and_an_absent_log_is_nothing_to_rotate(tmp_path):
    path = tmp_path / "mosquitto.eu-west-2.log"
    rotate_log(path)
    assert list(tmp_path.iterdir()) == []
    path.write_text("the run that was killed\n")
    rotate_log(path)
    assert not path.exists() and path.with_name(f"{path.name}.1").read_text() == "the run that was killed\n"
