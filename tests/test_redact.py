"""Credential masking for logs and MLflow params/tags."""

from __future__ import annotations

import random
import string

import pytest

from unmix_ray.redact import is_secret_like, is_secret_name, redact, safe_params

# AWS's documented example credentials (not real keys).
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("text, expected", [
    ("postgresql://mlflow:hunter2@db.internal:5432/mlflow",
     "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ("redis://:p%40ss@cache:6379/0", "redis://:***@cache:6379/0"),
    ("uri=mysql+pymysql://u:pw@h/db and more", "uri=mysql+pymysql://u:***@h/db and more"),
    ("https://user@example.com/x", "https://user@example.com/x"),  # no password: unchanged
    ("http://127.0.0.1:5000/path@v2", "http://127.0.0.1:5000/path@v2"),  # a port is not a password
    (f"key id {KEY_ID} here", "key id AKIA*** here"),
    (f"ASIA{'A' * 16}", "ASIA***"),
    (f"secret={SECRET}", "secret=***"),
    (f"the secret is {SECRET}.", "the secret is ***."),
    ("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Expires=60"),
    ("https://api.example.com/v1?user=me&token=s3cr3t#frag", "https://api.example.com/v1?user=me&token=***#frag"),
    ("https://h/x?api_key=zz&access_token=yy", "https://h/x?api_key=***&access_token=***"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc", "Authorization: Bearer ***"),
    ("AWS_SECRET_ACCESS_KEY=abcdef RAY_AUTH_TOKEN=0f9e8d7c", "AWS_SECRET_ACCESS_KEY=*** RAY_AUTH_TOKEN=***"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
     "-----BEGIN RSA PRIVATE KEY----- ***"),
])
def test_redact_masks_credentials(text, expected):
    assert redact(text) == expected
    assert is_secret_like(text) == (text != expected)


@pytest.mark.parametrize("text", [
    "git commit 4082301f3ae583aa0c2b8f6e1d0c9b8a7f6e5d4c",  # 40 hex chars: a commit id, not a key
    "s3://unmix-ray-artifacts/mlflow",
    "sqlite:////home/ray/mlflow/mlflow.db",
    "rayproject/ray:2.60.0-py311-gpu",
    "home/ray/Data/Imagenet/Train/n01440764ab",
    "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265",
    "RAY_AUTH_TOKEN_PATH=~/.ray/unmix-ray-aws.token",
    "Token authentication is enabled; Basic information",
    "simclr-cifar10-both-p0.5-s0",
    "arn:aws:iam::111122223333:role/unmix-ray-s3",
    "",
])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text
    assert not is_secret_like(text)


def test_random_40_char_secrets_are_caught():
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + "/+"
    misses = sum(not is_secret_like("x " + "".join(rng.choice(alphabet) for _ in range(40)) + " y")
                 for _ in range(2000))
    assert misses <= 2


def test_non_strings_are_not_secret_like():
    assert not is_secret_like(12345)
    assert not is_secret_like(None)


@pytest.mark.parametrize("name, secret", [
    ("password", True), ("db_password", True), ("apiKey", True), ("api_key", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("aws_access_key_id", True), ("mlflow.token", True),
    ("client_secret", True), ("num_tokens", False), ("knn_t", False), ("optim.lr", False),
    ("RAY_AUTH_MODE", False), ("author", False),
])
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_safe_params_masks_values_and_keeps_keys():
    params = {
        "optim.lr": 0.06,
        "tracking_uri": "postgresql://u:pw@db/mlflow",
        "db_password": "plain-looking",
        "storage": {"endpoint": f"https://h/?sig=abc1&key_id={KEY_ID}", "secret_key": SECRET},
        "tags": ["ok", f"AKID {KEY_ID}"],
        "empty_token": "",
        "seed": 3,
    }
    out = safe_params(params)
    assert out == {
        "optim.lr": 0.06,
        "tracking_uri": "postgresql://u:***@db/mlflow",
        "db_password": "***",
        "storage": {"endpoint": "https://h/?sig=***&key_id=AKIA***", "secret_key": "***"},
        "tags": ["ok", "AKID AKIA***"],
        "empty_token": "",
        "seed": 3,
    }
    assert params["db_password"] == "plain-looking"  # the input is not modified
