"""The start-up handshake: processes on threads (or, through main, subprocesses) meet at a free
localhost port; who is missing, who disagrees, and the address are named."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from mmg_jax import rendezvous

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(address, num_processes, process_id, timeout):
  """Runs rendezvous.meet on a thread, standing in for one process; returns a function that
  waits for it and returns the error it raised (None if it proceeded)."""
  errors = []

  def run():
    try:
      rendezvous.meet(address, num_processes, process_id, timeout)
    except rendezvous.RendezvousError as e:
      errors.append(e)

  thread = threading.Thread(target=run)
  thread.start()

  def outcome():
    thread.join(timeout + 20)
    assert not thread.is_alive(), f'process {process_id} neither proceeded nor gave up'
    return errors[0] if errors else None
  return outcome


def _meet(address, launches, timeout):
  """The outcomes of processes (num_processes, process_id) of `launches`, started at once."""
  outcomes = [_start(address, *launch, timeout) for launch in launches]
  return [outcome() for outcome in outcomes]


def test_all_processes_arrive_and_proceed_leaving_the_port_to_jax():
  """The other processes may start before process 0; once all proceed, nothing listens on the
  port any more (jax's coordination service binds it next)."""
  port = _free_port()
  assert _meet(f'127.0.0.1:{port}', [(3, 2), (3, 1), (3, 0)], timeout=30) == [None] * 3
  with pytest.raises(ConnectionRefusedError):
    socket.create_connection(('127.0.0.1', port)).close()


def test_process_0_names_the_missing_id_and_the_address():
  address = f'127.0.0.1:{_free_port()}'
  coordinator, peer = _meet(address, [(3, 0), (3, 1)], timeout=1)
  assert isinstance(coordinator, rendezvous.PeersMissing)
  assert str(coordinator) == f'process 2 of 3 did not reach the coordinator at {address}'
  # Process 0 told the process that did arrive whom it waited for.
  assert isinstance(peer, rendezvous.PeersMissing)
  assert str(peer) == (f'process 1 reached the coordinator at {address}, but process 2 of 3 '
                       'did not')


def test_several_missing_ids_are_all_named():
  address = f'127.0.0.1:{_free_port()}'
  coordinator, _ = _meet(address, [(5, 0), (5, 3)], timeout=1)
  assert str(coordinator) == f'processes 1, 2, 4 of 5 did not reach the coordinator at {address}'


def test_a_process_without_a_coordinator_names_the_address():
  address = f'127.0.0.1:{_free_port()}'
  (error,) = _meet(address, [(2, 1)], timeout=0.5)
  assert isinstance(error, rendezvous.PeersMissing)
  assert str(error) == f'process 1 could not reach the coordinator (process 0) at {address}'


def test_mismatched_num_processes_stops_both_naming_both_values():
  """Neither waits for the timeout: the launch cannot succeed."""
  start = time.monotonic()
  errors = _meet(f'127.0.0.1:{_free_port()}', [(3, 0), (4, 1)], timeout=60)
  assert time.monotonic() - start < 30
  for error in errors:
    assert type(error) is rendezvous.RendezvousError
    assert str(error).startswith('process 1 (on 127.0.0.1) was started with --num_processes=4 '
                                 'and process 0 with --num_processes=3')


def test_a_duplicate_id_stops_everyone_naming_it():
  start = time.monotonic()
  errors = _meet(f'127.0.0.1:{_free_port()}', [(3, 0), (3, 1), (3, 1)], timeout=60)
  assert time.monotonic() - start < 30
  for error in errors:
    assert type(error) is rendezvous.RendezvousError
    assert str(error).startswith('two processes were started with --process_id=1 (on 127.0.0.1 '
                                 'and 127.0.0.1)')


def test_a_stray_connection_neither_counts_nor_stops_process_0():
  """A port scan or health check that sends something else is ignored."""
  port = _free_port()
  coordinator = _start(f'127.0.0.1:{port}', 2, 0, timeout=30)
  with _connect(port) as stray:
    stray.sendall(b'GET / HTTP/1.0\r\n\r\n')
    assert _meet(f'127.0.0.1:{port}', [(2, 1)], timeout=30) == [None]
    assert coordinator() is None


def test_a_process_that_leaves_before_the_release_is_missing_again():
  """jax would wait for it in vain, so process 0 counts it missing."""
  port = _free_port()
  coordinator = _start(f'127.0.0.1:{port}', 3, 0, timeout=2)
  with _connect(port) as leaver:
    leaver.sendall(b'{"process_id": 1, "num_processes": 3}\n')
  assert str(coordinator()) == (
      f'processes 1, 2 of 3 did not reach the coordinator at 127.0.0.1:{port}')


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason='no IPv6 on this host')
def test_a_bracketed_ipv6_address_works():
  assert _meet(f'[::1]:{_free_port()}', [(2, 1), (2, 0)], timeout=30) == [None, None]


def _connect(port):
  """A raw connection to a process 0 that may not listen yet."""
  deadline = time.monotonic() + 30
  while True:
    try:
      return socket.create_connection(('127.0.0.1', port))
    except ConnectionRefusedError:
      if time.monotonic() > deadline:
        raise
      time.sleep(0.05)


def test_main_exits_2_naming_the_missing_process_before_any_training(tmp_path):
  """Two of three `mmg_jax.main` processes: both exit 2 after --distributed_timeout, before
  the workdir exists, process 0 naming process 2 and the coordinator."""
  address = f'localhost:{_free_port()}'
  workdir = tmp_path / 'workdir'
  processes = [
      subprocess.Popen([sys.executable, '-m', 'mmg_jax.main', '--config=configs/fewshot.py:tiny',
                        f'--coordinator_address={address}', '--num_processes=3',
                        f'--process_id={i}', '--distributed_timeout=5', f'--workdir={workdir}'],
                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outputs = [p.communicate(timeout=120) for p in processes]
  finally:
    for p in processes:
      p.kill()
  stderrs = [stderr for _, stderr in outputs]
  assert [p.returncode for p in processes] == [2, 2], stderrs
  assert (f'error: process 2 of 3 did not reach the coordinator at {address} within '
          '--distributed_timeout=5 s.') in stderrs[0]
  assert (f'error: process 1 reached the coordinator at {address}, but process 2 of 3 did '
          'not within --distributed_timeout=5 s.') in stderrs[1]
  assert not workdir.exists()
