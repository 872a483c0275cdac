"""Drive a robot from a policy server: camera image + instruction -> action, at a fixed rate.

  python -m rt2_jax.serve --workdir=RUN                 # where the accelerator is (or locally)
  python examples/robot_loop.py --url=http://127.0.0.1:8000 --instruction="put carrot on plate"

The "robot" here replays the camera frames of a real Bridge episode (the RLDS sample in
../shared/data, or --rlds_dir) and prints each commanded action next to the recorded one;
`--camera=noise` needs no dataset. To drive real hardware, replace `ReplayRobot` with a class
that has the same two methods: `observe() -> uint8 [H, W, 3]` and `apply(action_dict)`.

Safety: the loop holds the robot (`robot.hold()`) when a step fails, and stops after
`--max_failures` failures in a row; the client already retries transient errors within
`--timeout_s`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rt2_jax.client import PolicyClient, PolicyServerError  # noqa: E402

DEFAULT_RLDS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  'shared',
  'data',
  'bridge_dataset',
  '1.0.0',
)


def _fmt(vector) -> str:
  return ' '.join(f'{v:+.3f}' for v in np.ravel(vector))


class ReplayRobot:
  """Camera frames and recorded actions of one RLDS episode (Bridge layout)."""

  def __init__(self, rlds_dir: str, episode: int = 0, split: str = 'val'):
    import tensorflow_datasets as tfds  # only this replay source needs TensorFlow

    builder = tfds.builder_from_directory(rlds_dir)
    episode_ds = builder.as_dataset(split=split).skip(episode).take(1)
    steps = list(next(iter(episode_ds))['steps'].as_numpy_iterator())
    self.frames = [s['observation']['image_0'] for s in steps]
    self.recorded = [s['action'] for s in steps]
    self.instruction = steps[0]['language_instruction'].decode()
    self.t = 0

  def observe(self) -> np.ndarray:
    return self.frames[min(self.t, len(self.frames) - 1)]

  def apply(self, action: dict) -> None:
    commanded = np.concatenate([np.ravel(v) for v in action.values()])
    line = f'  step {self.t}: commanded {_fmt(commanded)}'
    if len(self.recorded[self.t]):
      line += f'\n          recorded  {_fmt(self.recorded[self.t])}'
    print(line)
    self.t += 1

  def hold(self) -> None:
    print(f'  step {self.t}: holding position')

  def done(self) -> bool:
    return self.t >= len(self.frames)


class NoiseCamera(ReplayRobot):
  """No dataset needed: random frames, actions only printed."""

  def __init__(self, shape, steps: int):
    rng = np.random.default_rng(0)
    self.frames = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(steps)]
    self.recorded = [np.zeros(0)] * steps
    self.instruction, self.t = 'put carrot on plate', 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--url', default='http://127.0.0.1:8000')
  parser.add_argument('--token', default=os.environ.get('RT2_SERVE_TOKEN'))
  parser.add_argument('--instruction', default='', help="default: the episode's own")
  parser.add_argument('--camera', choices=('rlds', 'noise'), default='rlds')
  parser.add_argument('--rlds_dir', default=DEFAULT_RLDS)
  parser.add_argument('--episode', type=int, default=0)
  parser.add_argument('--steps', type=int, default=10, help='steps of the noise camera')
  parser.add_argument('--hz', type=float, default=5.0, help='control rate')
  parser.add_argument('--timeout_s', type=float, default=2.0)
  parser.add_argument('--max_failures', type=int, default=3)
  args = parser.parse_args()

  # resize=True: the client scales camera frames to the policy's input size (bilinear).
  client = PolicyClient(
    args.url, token=args.token, timeout_s=args.timeout_s, retries=2, resize=True
  )
  meta = client.metadata()
  print(
    f'policy {meta.get("model_id", "?")}: image {meta.get("image_size")}, '
    f'actions {meta.get("action_names", "?")}'
  )
  if args.camera == 'rlds':
    robot = ReplayRobot(args.rlds_dir, args.episode)
  else:
    size = meta['image_size']
    h, w = (size, size) if isinstance(size, int) else size[:2]
    robot = NoiseCamera((h, w, 3), args.steps)
  instruction = args.instruction or robot.instruction
  print(f'instruction: {instruction!r}')

  period, failures, latencies = 1.0 / args.hz, 0, []
  while not robot.done():
    tick = time.perf_counter()
    try:
      action = client.act(robot.observe(), instruction)
    except PolicyServerError as e:
      failures += 1
      print(f'  policy call failed ({failures}/{args.max_failures}): {e}')
      robot.hold()
      if failures >= args.max_failures:
        sys.exit('too many failures in a row; stopping the robot')
      continue
    failures = 0
    latencies.append(time.perf_counter() - tick)
    robot.apply(action)
    time.sleep(max(0.0, period - (time.perf_counter() - tick)))
  lat = np.asarray(latencies) * 1000
  print(f'{len(lat)} steps; policy latency p50 {np.median(lat):.1f} ms, max {lat.max():.1f} ms')


if __name__ == '__main__':
  main()
