"""The CloudWatch lag probe against moto's server: GetMetricData, normalised to seconds."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import boto3
import pytest
from pydantic import TypeAdapter, ValidationError

from probes.kinds.cloudwatch import CloudWatchLagProber
from probes.spec import CloudWatchLagProbe, PostgresLagProbe, ProbeSpec

KEY = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}  # moto accepts any


@pytest.fixture
def cloudwatch(route53, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("cloudwatch", region_name="eu-west-1", endpoint_url=route53.url, **KEY)

    def put(namespace: str, name: str, dimensions: dict[str, str], value: float, unit: str) -> None:
        client.put_metric_data(
            Namespace=namespace,
            MetricData=[
                {
                    "MetricName": name,
                    "Dimensions": [{"Name": k, "Value": v} for k, v in dimensions.items()],
                    "Timestamp": datetime.now(UTC),
                    "Value": value,
                    "Unit": unit,
                }
            ],
        )

    return route53.url, put


async def probe(url: str, metric: str, dimensions: dict[str, str]):
    spec = CloudWatchLagProbe(
        name="replica-lag",
        metric=metric,
        aws_region="eu-west-1",
        dimensions=dimensions,
        endpoint_url=url,
        interval=60,
        timeout=5,
    )
    return await CloudWatchLagProber(spec, "eu-west-1", "controller")()


CASES = [
    # metric, namespace, CloudWatch name, dimensions, value put, unit, seconds expected
    ("aurora-global", "AWS/RDS", "AuroraGlobalDBReplicationLag", {"DBClusterIdentifier": "eu"}, 1500, "Milliseconds",
     1.5),
    ("aurora-rpo", "AWS/RDS", "AuroraGlobalDBRPOLag", {"DBClusterIdentifier": "rpo"}, 800, "Milliseconds", 0.8),
    ("rds-replica", "AWS/RDS", "ReplicaLag", {"DBInstanceIdentifier": "orders-replica"}, 7, "Seconds", 7.0),
    ("dynamodb", "AWS/DynamoDB", "ReplicationLatency", {"TableName": "c", "ReceivingRegion": "eu-west-1"}, 250,
     "Milliseconds", 0.25),
    ("s3", "AWS/S3", "ReplicationLatency", {"SourceBucket": "a", "DestinationBucket": "b", "RuleId": "all"}, 42,
     "Seconds", 42.0),
]  # fmt: skip


@pytest.mark.parametrize(("metric", "namespace", "name", "dimensions", "value", "unit", "seconds"), CASES)
async def test_each_source_s_metric_is_read_and_normalised_to_seconds(
    cloudwatch, metric, namespace, name, dimensions, value, unit, seconds
):
    url, put = cloudwatch
    put(namespace, name, dimensions, value, unit)
    result = await probe(url, metric, dimensions)
    assert result.ok, result.error
    assert result.extra["lag_seconds"] == pytest.approx(seconds)
    assert result.latency == pytest.approx(seconds)
    assert result.extra["metric"] == f"{namespace}/{name}"


async def test_missing_data_is_unknown_never_zero(cloudwatch):
    url, _ = cloudwatch
    result = await probe(url, "aurora-global", {"DBClusterIdentifier": "nobody-writes-this"})
    assert (result.ok, result.error_class) == (False, "no-data")
    assert result.extra["lag_seconds"] is None
    assert "lag unknown" in (result.error or "")


async def test_rds_replica_lag_of_minus_one_is_not_replicating_stalled_with_unknown_lag(cloudwatch):
    url, put = cloudwatch
    dims = {"DBInstanceIdentifier": "broken-replica"}
    put("AWS/RDS", "ReplicaLag", dims, -1, "Seconds")
    result = await probe(url, "rds-replica", dims)
    assert (result.ok, result.error_class) == (False, "stalled")
    assert result.extra["lag_seconds"] is None
    assert math.isinf(result.latency)


def test_the_replication_lag_kind_picks_its_source_postgres_by_default():
    adapter = TypeAdapter(ProbeSpec)
    pg = adapter.validate_python(
        {"kind": "replication-lag", "name": "db", "primary": {"env": "P"}, "replica": {"env": "R"}}
    )
    assert isinstance(pg, PostgresLagProbe)
    cw = adapter.validate_python(
        {"kind": "replication-lag", "source": "cloudwatch", "name": "g", "metric": "dynamodb",
         "aws_region": "eu-west-1", "dimensions": {"TableName": "t", "ReceivingRegion": "eu-west-1"}}
    )  # fmt: skip
    assert isinstance(cw, CloudWatchLagProbe)
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "replication-lag", "source": "cloudwatch", "name": "g", "metric": "latency"})
