"""A TensorBoard run read back as TensorBoard shows it: its event accumulator reads every event
file of the directory in order and drops the steps a later file purges."""
from tensorboard.backend.event_processing import event_accumulator

TEXT_SUFFIX = '/text_summary'  # what tensorboardX appends to a text's tag


def read(directory):
  """({tag: [(step, value)]} of the scalars, {tag: [(step, text)]} of the texts) of a run."""
  run = event_accumulator.EventAccumulator(
      str(directory), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
  run.Reload()
  tags = run.Tags()
  scalars = {tag: [(e.step, e.value) for e in run.Scalars(tag)] for tag in tags['scalars']}
  texts = {tag.removesuffix(TEXT_SUFFIX): [(e.step, e.tensor_proto.string_val[0].decode())
                                           for e in run.Tensors(tag)]
           for tag in tags['tensors']}
  return scalars, texts
