"""Request parsing of the policy server (rt2_jax.serve): body bytes -> (images, instructions),
with every check and a client-fit error message. Apart from the app so the app stays short; no
HTTP framework here, so it is testable alone."""

from __future__ import annotations

import json
import re

import numpy as np

from rt2_jax import wire
from rt2_jax.batcher import RequestError

# Most values in a body's lists (nested-list images): parsing millions holds the GIL for seconds,
# so more are refused (413) before parsing; images travel best as bytes anyway.
MAX_LIST_VALUES = 1_000_000


def _instruction(value, where: str) -> str:
  if not isinstance(value, str):
    raise RequestError(f'{where}: instruction must be a string, got {type(value).__name__}')
  if not value.strip():
    raise RequestError(f'{where}: instruction is empty')
  try:
    value.encode('utf-8')
  except UnicodeEncodeError as e:
    raise RequestError(
      f'{where}: instruction is not valid Unicode text: {e.reason} '
      f'{value[e.start]!r} at position {e.start}'
    ) from None
  return value


def _image(value, shape, where: str) -> np.ndarray:
  try:
    return wire.image_from_message(value, shape)
  except wire.WireError as e:
    raise RequestError(f'{where}: {e}') from None


def _field(obj: dict, key: str, where: str):
  if key not in obj:
    raise RequestError(f'{where}: missing field {key!r} (have {sorted(obj)})')
  return obj[key]


def _check_count(n: int, limit: int) -> None:
  if n == 0:
    raise RequestError('request holds no examples')
  if n > limit:
    raise RequestError(f'request holds {n} examples; at most {limit} are accepted', 413)


def parse_predict(body, shape, max_instances: int) -> tuple[list, list, bool]:
  """/predict body -> (images, instructions, is_batch)."""
  if not isinstance(body, dict):
    raise RequestError(f'body must be an object, got {type(body).__name__}')
  if 'images' in body or 'instructions' in body:
    images, instructions = _field(body, 'images', 'body'), _field(body, 'instructions', 'body')
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    if not isinstance(images, list) or not isinstance(instructions, list):
      raise RequestError('"images" and "instructions" must be lists')
    if len(images) != len(instructions):
      raise RequestError(f'{len(images)} images but {len(instructions)} instructions')
    _check_count(len(images), max_instances)
    return (
      [_image(v, shape, f'images[{i}]') for i, v in enumerate(images)],
      [_instruction(v, f'instructions[{i}]') for i, v in enumerate(instructions)],
      True,
    )
  image = _image(_field(body, 'image', 'body'), shape, 'image')
  return [image], [_instruction(_field(body, 'instruction', 'body'), 'body')], False


def parse_tf_serving(body, shape, max_instances: int) -> tuple[list, list, str]:
  """TF-Serving REST body -> (images, instructions, 'row'|'columnar')."""
  if not isinstance(body, dict):
    raise RequestError(f'body must be an object, got {type(body).__name__}')
  signature = body.get('signature_name', 'serving_default')
  if signature != 'serving_default':
    raise RequestError(f'unknown signature_name {signature!r}; this model has serving_default')
  if ('instances' in body) == ('inputs' in body):
    raise RequestError('body must hold exactly one of "instances" (row) or "inputs" (columnar)')
  if 'instances' in body:
    instances = body['instances']
    if not isinstance(instances, list):
      raise RequestError('"instances" must be a list')
    _check_count(len(instances), max_instances)
    images, instructions = [], []
    for i, inst in enumerate(instances):
      where = f'instances[{i}]'
      if not isinstance(inst, dict):
        raise RequestError(f'{where} must be an object with "image" and "instruction"')
      images.append(_image(_field(inst, 'image', where), shape, f'{where}.image'))
      instructions.append(_instruction(_field(inst, 'instruction', where), where))
    return images, instructions, 'row'
  inputs = body['inputs']
  if not isinstance(inputs, dict):
    raise RequestError('"inputs" must be an object with "image" and "instruction" lists')
  images, instructions = _field(inputs, 'image', 'inputs'), _field(inputs, 'instruction', 'inputs')
  if not isinstance(images, list) or not isinstance(instructions, list):
    raise RequestError('inputs "image" and "instruction" must be lists (batch first)')
  if len(images) != len(instructions):
    raise RequestError(f'{len(images)} images but {len(instructions)} instructions')
  _check_count(len(images), max_instances)
  return (
    [_image(v, shape, f'inputs.image[{i}]') for i, v in enumerate(images)],
    [_instruction(v, f'inputs.instruction[{i}]') for i, v in enumerate(instructions)],
    'columnar',
  )


def media_type(headers, name: str) -> str:
  return headers.get(name, '').split(';')[0].strip().lower()


def _too_many_values(limit: int) -> RequestError:
  return RequestError(
    f'body holds more than {limit} list values; send images as base64 PNG/JPEG '
    'or raw bytes, or as msgpack uint8 arrays, rather than as nested lists',
    413,
  )


def decode_body(body: bytes, content_type: str, max_list_values: int = MAX_LIST_VALUES):
  if content_type in wire.MSGPACK_TYPES:
    try:
      return wire.unpackb(body, max_list_values=max_list_values)
    except wire.TooManyValues:
      raise _too_many_values(max_list_values) from None
    except wire.WireError as e:
      raise RequestError(str(e)) from None
  if content_type not in ('', 'application/json', 'text/json'):
    raise RequestError(
      f'unsupported content type {content_type[:100]!r}; send application/json '
      f'or {wire.MSGPACK_TYPE}',
      415,
    )
  if body.count(b',') >= max_list_values:  # a cheap bound on the values, before parsing
    raise _too_many_values(max_list_values)
  try:
    return json.loads(body)
  except RecursionError:
    raise RequestError('body is not valid JSON here: nested too deeply') from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers of > 4300 digits
    raise RequestError(f'body is not valid JSON: {str(e)[:300]}') from None


def embodiment_of(message, known: list[str] | None = None, required: bool = False) -> str | None:
  """The body's optional top-level 'embodiment' (the robot dataset whose actions to decode, for
  a model trained on several: rt2_jax.data.embodiments), checked against `known`."""
  value = message.get('embodiment') if isinstance(message, dict) else None
  if value is None:
    if required:
      raise RequestError(
        f'this model was trained on several robot datasets: name one in "embodiment" '
        f'(one of {known})'
      )
    return None
  if not isinstance(value, str):
    raise RequestError(f'"embodiment" must be a string, got {type(value).__name__}')
  if known is not None and value not in known:
    raise RequestError(f'unknown embodiment {value!r}; known: {known}')
  return value


def parse_request(
  body: bytes, content_type: str, parse, shape, config, embodiments=None, multi: bool = False
):
  """Body bytes -> (images, instructions, kind): JSON/msgpack decoding, base64, image decoding
  and every check. Runs in a worker thread, never on the event loop. `config`: a
  serve.ServeConfig (max_list_values, max_instances, max_instruction_chars). `embodiments`: the
  robot datasets the model knows (then the result gets a 4th item, the body's 'embodiment',
  which must name one of them; `multi`: it must name one)."""
  message = decode_body(body, content_type, config.max_list_values)
  embodiment = embodiment_of(message, embodiments, required=multi) if embodiments else None
  images, instructions, kind = parse(message, shape, config.max_instances)
  for i, text in enumerate(instructions):
    if len(text) > config.max_instruction_chars:
      raise RequestError(
        f'instruction {i} has {len(text)} characters; at most '
        f'{config.max_instruction_chars} are accepted',
        413,
      )
  if embodiments:
    return images, instructions, kind, embodiment
  return images, instructions, kind


_ADDRESS = re.compile(r'<([\w.]+) object at 0x[0-9a-fA-F]+>|\bat 0x[0-9a-fA-F]{6,}\b')


def clean_message(text: str, limit: int = 1000) -> str:
  """An error text fit for a client: no object reprs with heap addresses, bounded length."""
  text = _ADDRESS.sub(lambda m: f'<{m.group(1)}>' if m.group(1) else '', str(text))
  return text if len(text) <= limit else text[:limit] + '...'
