"""Labels X-rays from their radiology reports: n-gram counts and a logistic regression (001, 3.3).

001 (sections 3.3 and 4.5) completes a partly labelled wrist data set: N1 reports carry a label
y (0 = no fracture, 1 = fracture), N2 do not. Each report is cleaned and vectorised into token
counts a_i [V], a_i[j] = the number of times n-gram j occurs in report i, over every unigram,
bigram and trigram of the training reports. A logistic regression is trained on the labelled
reports, its k-fold accuracy and pooled confusion matrix are reported (001: 98.4%, averaged over
5 runs), and it then labels the unlabelled reports.

Text (host side, python / numpy):
- `clean_text` lower-cases, drops apostrophes (so "patient's" -> "patients"), turns every other
  character that is not a letter a-z (punctuation, digits, non-ASCII) into a space and collapses
  whitespace; `tokenize` splits the result on spaces. N-grams are consecutive tokens of the
  whole report (they may cross sentence boundaries), joined by one space.
- `fit_vocabulary` keeps the n-grams of the training reports that occur at least `min_count`
  times in total, in sorted order; `count_matrix` ignores n-grams outside the vocabulary.

Model (JAX): p(y = 1 | a) = sigmoid(w . phi(a) + b), with phi one of `SCALINGS`: 'log1p'
(phi(a) = log(1 + a), the default: it keeps the count information but damps n-grams repeated
within a report), 'none' (raw counts, as 001 describes) or 'tf' (counts / the report's number of
in-vocabulary n-grams). The loss is the (example-weighted) mean binary cross-entropy plus
0.5 * l2 * |w|^2 (the bias is not penalised). It is minimised full-batch by L-BFGS (optax,
zoom line search) or Adam, `num_steps` steps in one jitted `lax.scan`.

Evaluation: `cross_validate` repeats a shuffled k-fold split `num_repeats` times; the
vocabulary of each fold is fitted on that fold's training reports only, so n-grams that occur
only in the test reports never become features. The confusion matrix is pooled over every fold
of every repeat (rows = true class, columns = predicted class, class 0 first).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import os
import re
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medxai_jax.train import metrics

SCALINGS = ("log1p", "none", "tf")
OPTIMIZERS = ("lbfgs", "adam")
CLASS_NAMES = ("no_fracture", "fracture")
_COLUMN_BUCKET = 256  # fits pad the vocabulary to a multiple of this (fewer compilations)
_APOSTROPHES = re.compile(r"['\u2019]")
_NON_LETTERS = re.compile(r"[^a-z]+")


# ---------------------------------------------------------------------------------------------
# Text.


def clean_text(text: str) -> str:
  """Lower-case letters a-z separated by single spaces (punctuation and digits removed)."""
  if not isinstance(text, str):
    raise ValueError(f"text must be a str; got {type(text).__name__}.")
  text = _APOSTROPHES.sub("", text.lower())
  return _NON_LETTERS.sub(" ", text).strip()


def tokenize(text: str) -> list[str]:
  """The words of the cleaned text, in order."""
  return clean_text(text).split()


def _check_ngram_range(ngram_range: Sequence[int]) -> tuple[int, int]:
  """(low, high) with 1 <= low <= high, or ValueError."""
  if len(ngram_range) != 2 or not 1 <= int(ngram_range[0]) <= int(ngram_range[1]):
    raise ValueError(f"ngram_range must be (low, high) with 1 <= low <= high; got "
                     f"{tuple(ngram_range)!r}.")
  return int(ngram_range[0]), int(ngram_range[1])


def ngrams(tokens: Sequence[str], ngram_range: Sequence[int] = (1, 3)) -> list[str]:
  """Every n-gram of `tokens` with n in [low, high], joined by spaces (by n, then position)."""
  low, high = _check_ngram_range(ngram_range)
  return [" ".join(tokens[start:start + n]) for n in range(low, high + 1)
          for start in range(len(tokens) - n + 1)]


@dataclasses.dataclass(frozen=True)
class NgramVocabulary:
  """The n-grams that are features, in column order; `index` maps an n-gram to its column."""

  ngrams: tuple[str, ...]
  ngram_range: tuple[int, int] = (1, 3)
  min_count: int = 1
  index: Mapping[str, int] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "ngram_range", _check_ngram_range(self.ngram_range))
    index = {ngram: column for column, ngram in enumerate(self.ngrams)}
    if len(index) != len(self.ngrams):
      raise ValueError("NgramVocabulary.ngrams holds duplicates.")
    object.__setattr__(self, "index", index)

  @property
  def size(self) -> int:
    """Number of features V."""
    return len(self.ngrams)

  def __contains__(self, ngram: str) -> bool:
    return ngram in self.index


def _check_texts(texts: Sequence[str], name: str) -> None:
  """Raise ValueError unless `texts` is a sequence of str."""
  if isinstance(texts, str):
    raise ValueError(f"{name} must be a sequence of reports, not one str.")
  for position, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"{name}[{position}] must be a str; got {type(text).__name__}.")


def fit_vocabulary(texts: Sequence[str], ngram_range: Sequence[int] = (1, 3),
                   min_count: int = 1) -> NgramVocabulary:
  """Sorted n-grams of `texts` occurring at least `min_count` times in all of them together."""
  _check_texts(texts, "texts")
  if int(min_count) < 1:
    raise ValueError(f"min_count must be >= 1; got {min_count}.")
  totals = collections.Counter()
  for text in texts:
    totals.update(ngrams(tokenize(text), ngram_range))
  kept = tuple(sorted(ngram for ngram, count in totals.items() if count >= min_count))
  return NgramVocabulary(kept, _check_ngram_range(ngram_range), int(min_count))


def count_matrix(vocabulary: NgramVocabulary, texts: Sequence[str]) -> np.ndarray:
  """Counts [N, V] float32: entry (i, j) is how often n-gram j occurs in report i."""
  _check_texts(texts, "texts")
  counts = np.zeros((len(texts), vocabulary.size), np.float32)
  for row, text in enumerate(texts):
    columns = [vocabulary.index[g] for g in ngrams(tokenize(text), vocabulary.ngram_range)
               if g in vocabulary.index]
    np.add.at(counts[row], np.asarray(columns, np.int64), 1.0)
  return counts


# ---------------------------------------------------------------------------------------------
# Logistic regression.


@flax.struct.dataclass
class LogisticRegression:
  """Parameters of p(y = 1 | a) = sigmoid(weights . phi(a) + bias); phi is `scaling`."""

  weights: jax.Array  # [V]
  bias: jax.Array  # []
  scaling: str = flax.struct.field(pytree_node=False, default="log1p")


def scale_counts(counts: jax.Array, scaling: str) -> jax.Array:
  """Features phi(a) [N, V] of counts [N, V] (see `SCALINGS`)."""
  if scaling not in SCALINGS:
    raise ValueError(f"scaling must be one of {SCALINGS}; got {scaling!r}.")
  counts = jnp.asarray(counts, jnp.float32)
  if scaling == "log1p":
    return jnp.log1p(counts)
  if scaling == "tf":
    return counts / jnp.maximum(counts.sum(axis=-1, keepdims=True), 1.0)
  return counts


def logistic_loss(params: LogisticRegression, features: jax.Array, labels: jax.Array,
                  l2: float, example_weights: jax.Array | None = None) -> jax.Array:
  """Weighted mean binary cross-entropy on (already scaled) features plus 0.5 l2 |w|^2."""
  logits = features @ params.weights + params.bias
  losses = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
  if example_weights is None:
    example_weights = jnp.ones_like(losses)
  data = jnp.sum(example_weights * losses) / jnp.maximum(jnp.sum(example_weights), 1e-12)
  return data + 0.5 * l2 * jnp.sum(params.weights ** 2)


@functools.partial(jax.jit, static_argnames=("optimizer", "learning_rate", "num_steps"))
def _minimise(params: LogisticRegression, features: jax.Array, labels: jax.Array,
              example_weights: jax.Array, l2: jax.Array, *, optimizer: str,
              learning_rate: float, num_steps: int) -> tuple[LogisticRegression, jax.Array]:
  """Parameters after `num_steps` full-batch steps, and the loss before each step [num_steps]."""
  value_fn = lambda p: logistic_loss(p, features, labels, l2, example_weights)  # noqa: E731
  if optimizer == "lbfgs":
    transform = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(value_fn)
  else:
    transform = optax.adam(learning_rate)
    value_and_grad = lambda p, state: jax.value_and_grad(value_fn)(p)  # noqa: E731

  def step(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, new_state = transform.update(grad, state, params, value=value, grad=grad,
                                          value_fn=value_fn)
    new_params = optax.apply_updates(params, updates)
    # Once converged, L-BFGS may propose a non-finite step; keep the last finite iterate then.
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf))
                                for leaf in jax.tree.leaves(new_params)]))
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda a, b: jnp.where(finite, a, b), new, old)
    return (keep(new_params, params), keep(new_state, state)), value

  (params, _), losses = jax.lax.scan(step, (params, transform.init(params)), None,
                                     length=num_steps)
  return params, losses


def fit_logistic_regression(counts: np.ndarray, labels: np.ndarray, *, key: jax.Array,
                            example_weights: np.ndarray | None = None, scaling: str = "log1p",
                            l2: float = 1e-3, optimizer: str = "lbfgs",
                            learning_rate: float = 0.05, num_steps: int = 100,
                            init_scale: float = 0.01) -> LogisticRegression:
  """Logistic regression fitted full-batch to counts [N, V] and labels [N] in {0, 1}.

  `key` draws the initial weights N(0, init_scale^2) (the loss is convex, so the optimum does not
  depend on it); `example_weights` [N] (e.g. 0 for padding rows) weight the mean loss;
  `learning_rate` is Adam's (L-BFGS uses its line search).
  """
  counts = jnp.asarray(counts, jnp.float32)
  if counts.ndim != 2:
    raise ValueError(f"counts must be [N, V]; got shape {tuple(counts.shape)}.")
  labels = np.asarray(labels)
  if labels.shape != counts.shape[:1]:
    raise ValueError(f"labels must be [N] = [{counts.shape[0]}]; got shape {labels.shape}.")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels must be 0 or 1; got values {sorted(set(labels.tolist()))}.")
  if example_weights is None:
    example_weights = np.ones(counts.shape[0], np.float32)
  example_weights = jnp.asarray(example_weights, jnp.float32)
  if example_weights.shape != counts.shape[:1]:
    raise ValueError(f"example_weights must be [N] = [{counts.shape[0]}]; got shape "
                     f"{tuple(example_weights.shape)}.")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}.")
  if num_steps < 1 or l2 < 0:
    raise ValueError(f"num_steps must be >= 1 and l2 >= 0; got {num_steps}, {l2}.")
  params = LogisticRegression(
      weights=init_scale * jax.random.normal(key, (counts.shape[1],), jnp.float32),
      bias=jnp.zeros((), jnp.float32), scaling=scaling)
  params, _ = _minimise(params, scale_counts(counts, scaling), jnp.asarray(labels, jnp.float32),
                        example_weights, jnp.float32(l2), optimizer=optimizer,
                        learning_rate=float(learning_rate), num_steps=int(num_steps))
  return params


@jax.jit
def predict_proba(params: LogisticRegression, counts: jax.Array) -> jax.Array:
  """p(y = 1) [N] of reports with counts [N, V] (the vocabulary the model was fitted on)."""
  logits = scale_counts(counts, params.scaling) @ params.weights + params.bias
  return jax.nn.sigmoid(logits)


# ---------------------------------------------------------------------------------------------
# Cross-validation and annotation.


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """The vectoriser's and the logistic regression's settings."""

  ngram_range: tuple[int, int] = (1, 3)
  min_count: int = 1
  scaling: str = "log1p"
  l2: float = 1e-3
  optimizer: str = "lbfgs"
  learning_rate: float = 0.05
  num_steps: int = 100
  threshold: float = 0.5  # predicted label = p(y = 1) >= threshold

  def fit_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `fit_logistic_regression`."""
    return dict(scaling=self.scaling, l2=self.l2, optimizer=self.optimizer,
                learning_rate=self.learning_rate, num_steps=self.num_steps)


def _as_labels(labels: np.ndarray, num_texts: int, name: str = "labels") -> np.ndarray:
  """Labels [N] as int32 in {0, 1}, or ValueError."""
  labels = np.asarray(labels)
  if labels.shape != (num_texts,):
    raise ValueError(f"{name} must be [N] = [{num_texts}] (one per report); got shape "
                     f"{labels.shape}.")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f"{name} must be 0 or 1; got values {sorted(set(labels.tolist()))}.")
  return labels.astype(np.int32)


def kfold_indices(num_examples: int, num_folds: int, key: jax.Array) -> list[np.ndarray]:
  """Test indices of each fold (sorted): a shuffled partition of range(num_examples)."""
  if not 2 <= num_folds <= num_examples:
    raise ValueError(f"num_folds must be in [2, num_examples={num_examples}]; got {num_folds}.")
  order = np.asarray(jax.random.permutation(key, num_examples))
  return [np.sort(fold) for fold in np.array_split(order, num_folds)]


def _bucketed(size: int) -> int:
  """`size` rounded up to a positive multiple of the column bucket (fewer jit compilations)."""
  return max(-(-size // _COLUMN_BUCKET), 1) * _COLUMN_BUCKET


def _pad(array: np.ndarray, rows: int, columns: int) -> np.ndarray:
  """`array` [R, C] zero-padded to [rows, columns]."""
  return np.pad(array, ((0, rows - array.shape[0]), (0, columns - array.shape[1])))


def cross_validate(texts: Sequence[str], labels: np.ndarray, *, key: jax.Array,
                   num_folds: int = 5, num_repeats: int = 1,
                   config: ClassifierConfig = ClassifierConfig()) -> dict[str, Any]:
  """Repeated k-fold accuracy and pooled confusion matrix; each fold fits its own vocabulary.

  Returns fold_accuracies [R, F], repeat_accuracies [R] (each repeat's pooled accuracy),
  mean_accuracy and std_accuracy (over all folds), confusion_matrix [2, 2] (counts pooled over
  all folds and repeats; rows = true class), per_class_accuracy [2] (% of each true class
  predicted correctly), vocabulary_sizes [R, F], probabilities [R, N] (out-of-fold p(y = 1)) and
  folds (per fold: repeat, fold, test_indices, vocabulary).
  """
  _check_texts(texts, "texts")
  labels = _as_labels(labels, len(texts))
  if num_repeats < 1:
    raise ValueError(f"num_repeats must be >= 1; got {num_repeats}.")
  if len(texts) < num_folds:
    raise ValueError(f"{len(texts)} labelled reports are fewer than num_folds={num_folds}.")
  texts = list(texts)
  folds = []
  for repeat, repeat_key in enumerate(jax.random.split(key, num_repeats)):
    split_key, fit_key = jax.random.split(repeat_key)
    for fold, test in enumerate(kfold_indices(len(texts), num_folds, split_key)):
      train = np.setdiff1d(np.arange(len(texts)), test)
      vocabulary = fit_vocabulary([texts[i] for i in train], config.ngram_range,
                                  config.min_count)
      folds.append(dict(repeat=repeat, fold=fold, test_indices=test, train_indices=train,
                        vocabulary=vocabulary, key=jax.random.fold_in(fit_key, fold)))
  # One padded shape for every fold, so the jitted fit compiles once: padded rows have weight
  # 0 and padded columns are all-zero features (their weights decay to the L2 optimum, 0).
  rows = max(len(f["train_indices"]) for f in folds)
  columns = _bucketed(max(f["vocabulary"].size for f in folds))
  probabilities = np.zeros((num_repeats, len(texts)), np.float32)
  fold_accuracies = np.zeros((num_repeats, num_folds))
  for f in folds:
    train, test, vocabulary = f["train_indices"], f["test_indices"], f["vocabulary"]
    counts = _pad(count_matrix(vocabulary, [texts[i] for i in train]), rows, columns)
    weights = np.arange(rows) < len(train)
    params = fit_logistic_regression(counts, _pad(labels[train][:, None], rows, 1)[:, 0],
                                     key=f.pop("key"), example_weights=weights,
                                     **config.fit_kwargs())
    test_counts = _pad(count_matrix(vocabulary, [texts[i] for i in test]), len(test), columns)
    probabilities[f["repeat"], test] = np.asarray(predict_proba(params, test_counts))
    predicted = probabilities[f["repeat"], test] >= config.threshold
    fold_accuracies[f["repeat"], f["fold"]] = np.mean(predicted == labels[test])
    f["accuracy"] = float(fold_accuracies[f["repeat"], f["fold"]])
    del f["train_indices"]
  predictions = (probabilities >= config.threshold).astype(np.int32)
  confusion = sum(metrics.confusion_matrix(labels, p, 2) for p in predictions)
  per_class = 100.0 * np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
  return dict(
      fold_accuracies=fold_accuracies,
      repeat_accuracies=np.mean(predictions == labels[None], axis=1),
      mean_accuracy=float(fold_accuracies.mean()), std_accuracy=float(fold_accuracies.std()),
      confusion_matrix=np.asarray(confusion, np.int64), per_class_accuracy=per_class,
      vocabulary_sizes=np.array([f["vocabulary"].size for f in folds]).reshape(
          num_repeats, num_folds),
      probabilities=probabilities, folds=folds)


def annotate(labelled_texts: Sequence[str], labels: np.ndarray, unlabelled_texts: Sequence[str],
             *, key: jax.Array, config: ClassifierConfig = ClassifierConfig()
             ) -> tuple[np.ndarray, np.ndarray]:
  """Predicted labels [N2] (int32) and p(y = 1) [N2] of unlabelled reports; fits all labelled."""
  _check_texts(labelled_texts, "labelled_texts")
  _check_texts(unlabelled_texts, "unlabelled_texts")
  labels = _as_labels(labels, len(labelled_texts))
  if len(set(labels.tolist())) < 2:
    raise ValueError("labels must contain both classes (0 and 1) to train the classifier.")
  vocabulary = fit_vocabulary(labelled_texts, config.ngram_range, config.min_count)
  columns = _bucketed(vocabulary.size)
  counts = _pad(count_matrix(vocabulary, labelled_texts), len(labels), columns)
  params = fit_logistic_regression(counts, labels, key=key, **config.fit_kwargs())
  if not unlabelled_texts:
    return np.zeros((0,), np.int32), np.zeros((0,), np.float32)
  counts = _pad(count_matrix(vocabulary, unlabelled_texts), len(unlabelled_texts), columns)
  probabilities = np.asarray(predict_proba(params, counts))
  return (probabilities >= config.threshold).astype(np.int32), probabilities


# ---------------------------------------------------------------------------------------------
# Report tables (CSV).


@dataclasses.dataclass(frozen=True)
class ReportTable:
  """The rows of a report CSV and its parsed texts and labels (-1 = unlabelled)."""

  fieldnames: tuple[str, ...]
  rows: tuple[dict[str, str], ...]
  texts: tuple[str, ...]
  labels: np.ndarray  # [N] int32 in {-1, 0, 1}

  @property
  def labelled(self) -> np.ndarray:
    """Boolean [N]: rows with a manual label."""
    return self.labels >= 0


def read_report_table(path: str, text_column: str = "report", label_column: str = "label",
                      id_column: str = "") -> ReportTable:
  """A report CSV: `text_column` holds reports, `label_column` 0, 1 or empty (unlabelled)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Report CSV {path!r} does not exist.")
  with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: drops a byte-order mark
    reader = csv.DictReader(f)
    fieldnames = tuple(reader.fieldnames or ())
    required = {"text_column": text_column, "label_column": label_column}
    if id_column:
      required["id_column"] = id_column
    for flag, column in required.items():
      if column not in fieldnames:
        raise ValueError(f"{path}: {flag}={column!r} is not a column; available columns: "
                         f"{list(fieldnames)}.")
    rows = tuple(reader)
  labels = np.full(len(rows), -1, np.int32)
  for number, row in enumerate(rows):
    value = (row[label_column] or "").strip()
    if value in ("0", "1"):
      labels[number] = int(value)
    elif value:
      raise ValueError(f"{path}: row {number + 2} (line, counting the header) has "
                       f"{label_column}={value!r}; labels must be 0, 1 or empty (unlabelled).")
  if id_column:
    ids = collections.Counter(row[id_column] for row in rows)
    repeated = sorted(value for value, count in ids.items() if count > 1)
    if repeated:
      raise ValueError(f"{path}: id_column={id_column!r} repeats the ids {repeated[:5]}.")
  texts = tuple(row[text_column] or "" for row in rows)
  return ReportTable(fieldnames, rows, texts, labels)


# ---------------------------------------------------------------------------------------------
# Synthetic wrist reports.

_SIDES = ("left", "right")
_VIEWS = ("Two views of the {side} wrist.", "Three views of the {side} wrist.",
          "PA, lateral and oblique views of the {side} wrist were obtained.",
          "Radiographs of the {side} wrist, 3 views.", "{side} wrist series, 2 views.")
_HISTORIES = ("Clinical history: fall on outstretched hand, rule out fracture.",
              "History: {side} wrist pain after a fall.",
              "Indication: trauma to the {side} wrist, query fracture.",
              "Clinical information: tenderness over the anatomical snuffbox.",
              "History: sports injury, pain and swelling.",
              "Indication: follow-up, assess for fracture.")
_COMPARISONS = ("No prior studies for comparison.", "Comparison: none.",
                "Compared with the study dated 12/03/2019.", "")
_FILLERS = ("Alignment is maintained.", "Alignment is anatomic.", "Joint spaces are preserved.",
            "The carpal bones are normally aligned.", "Bone mineralization is normal.",
            "Mild degenerative changes at the first carpometacarpal joint.",
            "Soft tissue swelling is noted.", "No dislocation.", "The radiocarpal joint is normal.",
            "No radiopaque foreign body.")
_POSITIVE_FINDINGS = (
    "There is a {kind} fracture of the distal radius with dorsal angulation.",
    "There is a {kind} fracture of the distal radius.",
    "{displacement} fracture of the ulnar styloid process.",
    "A fracture line is seen through the scaphoid waist.",
    "Buckle fracture of the distal radial metaphysis.",
    "Intra-articular extension of the distal radius fracture is noted.",
    "Acute {kind} fracture of the {bone} is identified.",
    "{displacement} fracture of the {bone}.",
)
_NEGATIVE_FINDINGS = (
    "No acute fracture or dislocation.",
    "No evidence of fracture.",
    "Soft tissue swelling without fracture.",
    "There is no displaced fracture.",
    "A fracture is not seen.",
    "Negative for fracture.",
    "No radiographic evidence of an acute fracture of the distal radius.",
    "Old healed fracture of the distal radius, no acute fracture.",
    "No fracture of the {bone} is identified.",
)
_POSITIVE_IMPRESSIONS = ("Impression: distal radius fracture.",
                         "Impression: acute fracture as described.",
                         "Impression: {displacement} fracture. No other fracture is seen.",
                         "Impression: fracture of the {bone}.")
_NEGATIVE_IMPRESSIONS = ("Impression: no acute osseous abnormality.",
                         "Impression: normal wrist radiographs.", "Impression: no fracture.",
                         "Impression: no acute fracture of the {bone}.")
_KINDS = ("transverse", "oblique", "comminuted", "impacted", "spiral")
_DISPLACEMENTS = ("Displaced", "Mildly displaced", "Nondisplaced", "Minimally displaced")
_BONES = ("distal radius", "ulnar styloid", "scaphoid", "triquetrum", "distal ulna",
          "radial styloid")


def _rng(key: jax.Array) -> np.random.Generator:
  """A numpy generator seeded by a (typed or raw uint32) JAX key."""
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def _synthetic_report(rng: np.random.Generator, positive: bool) -> str:
  """One wrist radiograph report; it states a fracture finding iff `positive`."""
  pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
  fill = lambda template: template.format(  # noqa: E731
      side=side, kind=pick(_KINDS), displacement=pick(_DISPLACEMENTS), bone=pick(_BONES))
  side = pick(_SIDES)
  findings = _POSITIVE_FINDINGS if positive else _NEGATIVE_FINDINGS
  impressions = _POSITIVE_IMPRESSIONS if positive else _NEGATIVE_IMPRESSIONS
  num_findings = 1 + int(rng.random() < 0.4)
  body = [fill(findings[i]) for i in rng.choice(len(findings), num_findings, replace=False)]
  body += [_FILLERS[i] for i in rng.choice(len(_FILLERS), rng.integers(1, 4), replace=False)]
  rng.shuffle(body)
  sentences = [fill(pick(_HISTORIES)), fill(pick(_VIEWS)), pick(_COMPARISONS), *body,
               fill(pick(impressions))]
  return " ".join(sentence[0].upper() + sentence[1:] for sentence in sentences if sentence)


def synthetic_reports(key: jax.Array, num_reports: int, *, positive_fraction: float = 0.5,
                      label_noise: float = 0.0) -> tuple[list[str], np.ndarray]:
  """Wrist radiograph reports and labels [N] (1 = fracture), deterministic for `key`.

  The rule: a report is positive iff it states a fracture finding (e.g. "transverse fracture of
  the distal radius"); negatives mention fractures too, negated ("no acute fracture", "without
  fracture", "old healed fracture"), and both share history, view and filler sentences, so the
  unigram "fracture" alone does not separate them. `label_noise` flips each label with that
  probability after writing the report.
  """
  if num_reports < 0:
    raise ValueError(f"num_reports must be >= 0; got {num_reports}.")
  if not 0.0 <= positive_fraction <= 1.0 or not 0.0 <= label_noise <= 1.0:
    raise ValueError(f"positive_fraction and label_noise must be in [0, 1]; got "
                     f"{positive_fraction}, {label_noise}.")
  rng = _rng(key)
  num_positive = int(round(positive_fraction * num_reports))
  positive = rng.permutation(np.arange(num_reports) < num_positive)
  texts = [_synthetic_report(rng, bool(p)) for p in positive]
  flips = rng.random(num_reports) < label_noise
  return texts, (positive ^ flips).astype(np.int32)


def unlabelled_mask(key: jax.Array, num_reports: int, fraction: float) -> np.ndarray:
  """A bool mask [N] with round(fraction * N) randomly chosen rows set: the unlabelled reports."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"The unlabelled fraction must be in [0, 1]; got {fraction}.")
  mask = np.zeros(num_reports, bool)
  chosen = np.asarray(jax.random.permutation(key, num_reports))[:int(round(fraction * num_reports))]
  mask[chosen] = True
  return mask
