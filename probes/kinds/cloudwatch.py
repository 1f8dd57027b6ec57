"""The `replication-lag` probe kind, CloudWatch source: the replication lag the cloud reports,
read with `GetMetricData` and normalised to seconds.

| metric                | namespace    | unit | dimensions (typical)                          |
| --------------------- | ------------ | ---- | --------------------------------------------- |
| aurora-global         | AWS/RDS      | ms   | DBClusterIdentifier (AuroraGlobalDBReplicationLag) |
| aurora-rpo            | AWS/RDS      | ms   | DBClusterIdentifier (AuroraGlobalDBRPOLag)    |
| rds-replica           | AWS/RDS      | s    | DBInstanceIdentifier (ReplicaLag; -1 = not replicating) |
| dynamodb              | AWS/DynamoDB | ms   | TableName, ReceivingRegion (ReplicationLatency) |
| s3                    | AWS/S3       | s    | SourceBucket, DestinationBucket, RuleId (ReplicationLatency) |

The newest datapoint within `lookback` (the period's maximum) is the lag. No datapoint is
`no-data`: lag unknown, never zero. RDS's -1 is `stalled` (the replica is not replicating).
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from probes.results import Result, Subject

if TYPE_CHECKING:
    from probes.spec import CloudWatchLagProbe

# metric -> (namespace, CloudWatch metric name, seconds per unit)
METRICS: dict[str, tuple[str, str, float]] = {
    "aurora-global": ("AWS/RDS", "AuroraGlobalDBReplicationLag", 0.001),
    "aurora-rpo": ("AWS/RDS", "AuroraGlobalDBRPOLag", 0.001),
    "rds-replica": ("AWS/RDS", "ReplicaLag", 1.0),
    "dynamodb": ("AWS/DynamoDB", "ReplicationLatency", 0.001),
    "s3": ("AWS/S3", "ReplicationLatency", 1.0),
}


class CloudWatchLagProber:
    """Runs one `CloudWatchLagProbe` for a region from a vantage."""

    def __init__(self, spec: CloudWatchLagProbe, region: str, vantage: str) -> None:
        self.spec = spec
        self.subject = Subject(region, spec.name, vantage)
        self._client: Any = None

    def _cloudwatch(self) -> Any:
        if self._client is None:
            config = BotoConfig(
                connect_timeout=self.spec.timeout, read_timeout=self.spec.timeout, retries={"max_attempts": 1}
            )
            self._client = boto3.client(
                "cloudwatch", region_name=self.spec.aws_region, endpoint_url=self.spec.endpoint_url, config=config
            )
        return self._client

    async def __call__(self) -> Result:
        started_at = time.time()
        start = time.monotonic()
        namespace, name, scale = METRICS[self.spec.metric]
        extra: dict[str, Any] = {"lag_seconds": None, "metric": f"{namespace}/{name}"}
        try:
            async with asyncio.timeout(self.spec.timeout):
                value, at = await asyncio.to_thread(self._newest, namespace, name)
        except TimeoutError:
            return self._result(started_at, start, extra, "timeout", f"GetMetricData took over {self.spec.timeout:g}s")
        except (BotoCoreError, ClientError) as exc:
            return self._result(started_at, start, extra, "query", f"GetMetricData failed: {exc}")
        if value is None or at is None:
            message = f"no {name} datapoint in the last {self.spec.lookback:g}s: lag unknown"
            return self._result(started_at, start, extra, "no-data", message)
        extra["period_start_age"] = round(started_at - at.timestamp(), 3)  # the datapoint's period began
        if self.spec.metric == "rds-replica" and value < 0:
            extra["stalled"] = True
            message = "ReplicaLag is -1: the replica is not replicating; lag unknown"
            return self._result(started_at, start, extra, "stalled", message, lag=math.inf)
        extra["lag_seconds"] = round(value * scale, 4)
        return self._result(started_at, start, extra, None, None)

    def _newest(self, namespace: str, name: str) -> tuple[float | None, datetime | None]:
        # Up to the end of the current period: a datapoint of this second is in it (the API
        # compares whole seconds, and a period is named by its start).
        end = datetime.now(UTC) + timedelta(seconds=self.spec.period)
        response = self._cloudwatch().get_metric_data(
            MetricDataQueries=[
                {
                    "Id": "lag",
                    "MetricStat": {
                        "Metric": {
                            "Namespace": namespace,
                            "MetricName": name,
                            # In the configured order: CloudWatch treats them as a set, moto
                            # (the tests' CloudWatch) matches the order it was given.
                            "Dimensions": [{"Name": k, "Value": v} for k, v in self.spec.dimensions.items()],
                        },
                        "Period": max(1, int(self.spec.period)),
                        "Stat": "Maximum",
                    },
                    "ReturnData": True,
                }
            ],
            StartTime=end - timedelta(seconds=self.spec.lookback + self.spec.period),
            EndTime=end,
            ScanBy="TimestampDescending",
        )
        for series in response.get("MetricDataResults", []):
            points = sorted(zip(series.get("Timestamps", []), series.get("Values", []), strict=False), reverse=True)
            if points:
                at, value = points[0]
                return float(value), at
        return None, None

    def _result(
        self,
        started_at: float,
        start: float,
        extra: dict[str, Any],
        error_class: str | None,
        error: str | None,
        lag: float | None = None,
    ) -> Result:
        return self.subject.lag_result(started_at, time.monotonic() - start, extra, error_class, error, lag)
