"""The start-up handshake of a launch given --coordinator_address, --num_processes, --process_id.

jax's coordination service does not say which processes registered: when its timeout expires it
aborts naming none. So before jax.distributed.initialize, process 0 listens on the coordinator's
port and every other process checks in there with its id and process count. Once ids 1..N-1
have all checked in, process 0 releases them and closes the port, which jax then binds. A
timeout or an inconsistent launch raises, in every process, an error naming the coordinator and
the process ids concerned.

The coordinator's own port, rather than a second one, because it is the one port the user chose
and opened between the hosts: a derived port (say PORT + 1) could be taken or firewalled, and a
flag for it would be one more thing to get wrong. Nothing else uses the port yet: jax binds it
only after the handshake, with SO_REUSEADDR, so the handshake's closed connections (TIME_WAIT)
do not keep it from doing so.

One JSON line each way. A process sends {"process_id": i, "num_processes": n}; process 0
answers {"proceed": true}, {"missing": [ids]} when it gave up waiting for those ids, or
{"error": text} when the launch is inconsistent (every process then raises `text`).
"""
import dataclasses
import ipaddress
import json
import selectors
import socket
import time

# A process that has checked in waits for process 0's answer this much longer than `timeout`:
# process 0 started listening before the connection, so its own deadline comes sooner.
_ANSWER_GRACE_SECONDS = 5
_RETRY_SECONDS = 0.2  # between attempts to reach a process 0 that is not listening yet
_LINE_LIMIT = 1024  # bytes; a longer first line is not one of ours


class RendezvousError(Exception):
  """The processes of a launch disagree (process count, ids) or cannot meet."""


class PeersMissing(RendezvousError):
  """Processes did not check in before the timeout; the message names them and the address."""


@dataclasses.dataclass
class _Caller:
  """A connection to process 0's port and what it has said so far."""
  connection: socket.socket
  host: str
  received: bytes = b''
  process_id: int | None = None


def split_address(address):
  """'HOST:PORT' or '[IPV6]:PORT' -> (host, port)."""
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise RendezvousError(f'the coordinator address {address!r} is not HOST:PORT')
  return host.strip('[]'), int(port)


def meet(address, num_processes, process_id, timeout):
  """Returns once all `num_processes` processes have checked in with process 0 at `address`.

  Raises PeersMissing when they have not within `timeout` seconds, and RendezvousError when
  two processes claim the same id or disagree on `num_processes`, when process 0 cannot listen
  on the port, or when it hangs up.
  """
  if process_id == 0:
    wait_for_peers(address, num_processes, timeout)
  else:
    check_in(address, num_processes, process_id, timeout)


def wait_for_peers(address, num_processes, timeout):
  """Process 0: listens on the address's port until processes 1..num_processes-1 have checked
  in, then releases them and returns with the port closed."""
  deadline = time.monotonic() + timeout
  arrived = {}  # process id -> _Caller
  with _listen(address) as server, selectors.DefaultSelector() as selector:
    selector.register(server, selectors.EVENT_READ)
    try:
      while len(arrived) < num_processes - 1:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          missing = [i for i in range(1, num_processes) if i not in arrived]
          _send(arrived.values(), {'missing': missing})
          raise PeersMissing(f'{_processes(missing, num_processes)} did not reach the '
                             f'coordinator at {address}')
        for key, _ in selector.select(remaining):
          if key.fileobj is server:
            connection, (host, *_) = server.accept()
            selector.register(connection, selectors.EVENT_READ,
                              _Caller(connection, _readable_host(host)))
          else:
            _receive(key.data, selector, arrived, num_processes)
      _send(arrived.values(), {'proceed': True})
    finally:
      for key in list(selector.get_map().values()):
        key.fileobj.close()


def check_in(address, num_processes, process_id, timeout):
  """Process `process_id` > 0: connects to process 0 (retrying until `timeout`, as it may start
  later), says who it is, and returns once process 0 releases it."""
  host, port = split_address(address)
  connection = _connect(host, port, time.monotonic() + timeout)
  if connection is None:
    raise PeersMissing(
        f'process {process_id} could not reach the coordinator (process 0) at {address}')
  with connection:
    connection.sendall(_line({'process_id': process_id, 'num_processes': num_processes}))
    connection.settimeout(timeout + _ANSWER_GRACE_SECONDS)
    try:
      answer = json.loads(connection.makefile('rb').readline(_LINE_LIMIT) or 'null')
    except TimeoutError:
      raise RendezvousError(
          f'process 0 (the coordinator at {address}) did not answer process {process_id} '
          f'within {timeout + _ANSWER_GRACE_SECONDS} s of its checking in') from None
    except (OSError, ValueError):
      answer = None
  if answer is None:
    raise RendezvousError(f'process 0 (the coordinator at {address}) hung up before releasing '
                          f'process {process_id}; its output says why')
  if 'missing' in answer:
    raise PeersMissing(f'process {process_id} reached the coordinator at {address}, but '
                       f'{_processes(answer["missing"], num_processes)} did not')
  if 'error' in answer:
    raise RendezvousError(answer['error'])


def _listen(address):
  """A listening socket on the address's port, every interface (jax's service binds them all)."""
  port = split_address(address)[1]
  try:
    if socket.has_dualstack_ipv6():
      return socket.create_server(('', port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(('', port))
  except OSError as e:
    raise RendezvousError(f'process 0 cannot listen on port {port} of the coordinator address '
                          f'{address}: {e.strerror}; choose another port') from e


def _readable_host(host):
  """'::ffff:10.0.0.2' (an IPv4 caller of a dual-stack socket) -> '10.0.0.2'."""
  mapped = ipaddress.ip_address(host.partition('%')[0]).ipv4_mapped
  return str(mapped) if mapped else host


def _receive(caller, selector, arrived, num_processes):
  """Reads what `caller` sent: its check-in (an inconsistent one raises), or its hang-up."""
  try:
    data = caller.connection.recv(_LINE_LIMIT)
  except OSError:
    data = b''
  if caller.process_id is not None:  # checked in already: only a hang-up can follow
    if not data:  # it stopped; jax would wait for it in vain
      del arrived[caller.process_id]
      _drop(caller, selector)
    return
  caller.received += data
  line, newline, _ = caller.received.partition(b'\n')
  if not newline:
    if not data or len(caller.received) > _LINE_LIMIT:
      _drop(caller, selector)
    return
  try:
    hello = json.loads(line)
    process_id, count = int(hello['process_id']), int(hello['num_processes'])
  except (ValueError, TypeError, KeyError):  # not one of ours (a port scan, a health check)
    _drop(caller, selector)
    return
  error = _inconsistency(caller.host, process_id, count, num_processes, arrived)
  if error:
    _send([*arrived.values(), caller], {'error': error})
    raise RendezvousError(error)
  caller.process_id = process_id
  arrived[process_id] = caller


def _inconsistency(host, process_id, count, num_processes, arrived):
  """Why a check-in from `host` contradicts the launch, or None."""
  if count != num_processes:
    return (f'process {process_id} (on {host}) was started with --num_processes={count} and '
            f'process 0 with --num_processes={num_processes}; give every process the same')
  if not 1 <= process_id < num_processes:
    return (f'a process on {host} was started with --process_id={process_id}; with '
            f'--num_processes={num_processes} the ids are 0..{num_processes - 1}, 0 the '
            f'coordinator\'s')
  if process_id in arrived:
    return (f'two processes were started with --process_id={process_id} (on '
            f'{arrived[process_id].host} and {host}); give each process its own id')
  return None


def _processes(ids, num_processes):
  """[2, 3], 4 -> 'processes 2, 3 of 4'."""
  noun = 'process' if len(ids) == 1 else 'processes'
  return f'{noun} {", ".join(map(str, ids))} of {num_processes}'


def _connect(host, port, deadline):
  """A connection to host:port, retried until `deadline`; None if there was none by then."""
  while (remaining := deadline - time.monotonic()) > 0:
    try:
      return socket.create_connection((host, port), timeout=remaining)
    except OSError:
      time.sleep(min(_RETRY_SECONDS, max(deadline - time.monotonic(), 0)))
  return None


def _send(callers, message):
  """Sends `message` to every caller that still listens."""
  for caller in callers:
    try:
      caller.connection.sendall(_line(message))
    except OSError:
      pass  # it hung up; it has nothing left to be told


def _drop(caller, selector):
  selector.unregister(caller.connection)
  caller.connection.close()


def _line(message):
  return json.dumps(message).encode() + b'\n'
