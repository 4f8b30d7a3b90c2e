#!/usr/bin/env python3
"""Prints the REST request/response examples of docs/SERVING.md from a real export.

  python docs/serving_examples.py savedmodels/mnist_vae/1 > /tmp/examples.md

Requests use TF Serving's columnar "inputs" format; the image is the first MNIST test digit,
binarized with tfvae's fixed test seed, one row of pixels per line. Responses are what the
export returns, rounded to 4 decimals, with the large image outputs elided.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def image_json(image: np.ndarray) -> str:
  rows = [",".join(f"[{int(p)}]" for p in row[:, 0]) for row in image]
  return "[[\n    [" + "],\n    [".join(rows) + "]\n  ]]"


def rounded(value):
  return np.round(np.asarray(value, np.float64), 4).tolist()


def block(kind: str, text: str) -> str:
  return f"{kind}:\n\n```json\n{text}\n```\n"


def main(path: str) -> None:
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from tfvae import data

  x = data.eval_arrays(data.load("mnist").x_test[:1], bernoulli=True, binary=False)
  model = tf.saved_model.load(path)
  z = model.signatures["encode"](x=tf.constant(x))["latent_mean"].numpy()
  examples = [
      ("serving_default", f'"x": {image_json(x[0])}', {"x": x}),
      ("decode", f'"z": {json.dumps(rounded(z))}', {"z": np.round(z, 4).astype(np.float32)}),
      ("sample", '"count": 2, "seed": 7', {"count": np.int32(2), "seed": np.int64(7)}),
      ("log_likelihood", f'"x": {image_json(x[0])},\n  "num_samples": 1000, "seed": 0',
       {"x": x, "num_samples": np.int32(1000), "seed": np.int64(0)}),
  ]
  for name, inputs_text, inputs in examples:
    request = f'{{"signature_name": "{name}", "inputs": {{\n  {inputs_text}\n}}}}'
    outputs = model.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
    response = {key: (f"<{'x'.join(map(str, value.shape))} floats>"
                      if value.shape.num_elements() > 64 else rounded(value.numpy()))
                for key, value in sorted(outputs.items())}
    print(f"### {name}\n")
    print(block("Request", request))
    print(block("Response (abbreviated where marked)", json.dumps({"outputs": response})))


if __name__ == "__main__":
  main(sys.argv[1])
