"""Cluster model: scenario builders, validation errors, JSON round trip."""
import json

import numpy as np
import pytest

from hetjax.cluster import Cluster, Device, dtfm_case, get_cluster, mixed_worldwide
from hetjax.errors import HetjaxError


def _two(gpu='T4', delay=((0, 1), (1, 0)), bw=((0, 5), (5, 0))):
  return Cluster('t', [Device(0, gpu, 'h0', 'r'), Device(1, gpu, 'h1', 'r')], delay, bw)


def test_dtfm_scenarios_match_paper_facts():
  c1 = dtfm_case(1)
  assert c1.n == 64 and len(c1.hosts()) == 8
  assert c1.bandwidth_gbps[0, 1] == 100.0 and c1.bandwidth_gbps[0, 8] == 3.125
  c2 = dtfm_case(2)
  assert c2.bandwidth_gbps[0, 3] == 100.0 and c2.bandwidth_gbps[0, 4] == 1.25 and c2.bandwidth_gbps[40, 41] == 1.25
  c3 = dtfm_case(3)
  assert (c3.delay_ms[0, 63], c3.bandwidth_gbps[0, 63]) == (11, 1.12) and c3.bandwidth_gbps[0, 31] == 5.0
  c4 = dtfm_case(4)   # Virginia 0-15, Oregon 16-31
  assert (c4.delay_ms[0, 16], c4.bandwidth_gbps[0, 16]) == (67, 1.15)
  c5 = dtfm_case(5)   # Tokyo 24-31, London 40-47
  assert (c5.delay_ms[24, 40], c5.bandwidth_gbps[24, 40]) == (210, 0.366)
  assert dtfm_case(5, n=16).n == 16 and len(dtfm_case(5, n=16).regions()) == 8


def test_mixed_and_files_and_round_trip(tmp_path):
  m = mixed_worldwide()
  assert len({d.gpu for d in m.devices}) == 4 and m.same_host([0, 1, 2, 3]) and not m.same_host([3, 4])
  lab = get_cluster('small_lab')
  assert lab.n == 16 and lab.bandwidth_gbps[0, 4] == 10.0 and lab.delay_ms[0, 8] == 20.0
  p = tmp_path / 'c.json'
  lab.save(str(p))
  again = get_cluster(str(p))
  assert np.array_equal(again.bandwidth_gbps, lab.bandwidth_gbps) and again.devices == lab.devices
  assert lab.transfer_time(1e9, 0, 8) == pytest.approx(0.020 + 8.0)


@pytest.mark.parametrize('kwargs,msg', [
    (dict(delay=((0, 1, 2), (1, 0, 2))), 'square'),
    (dict(bw=((0, 0), (0, 0))), 'must be positive'),
    (dict(bw=((0, 5), (4, 0))), 'not symmetric'),
    (dict(gpu='GTX-9999'), 'unknown GPU'),
])
def test_bad_clusters(kwargs, msg):
  with pytest.raises(HetjaxError, match=msg):
    _two(**kwargs)


def test_bad_names_and_files(tmp_path):
  with pytest.raises(HetjaxError, match='unknown cluster'):
    get_cluster('nowhere')
  p = tmp_path / 'bad.json'
  p.write_text(json.dumps({'devices': [{'gpu': 'T4'}], 'links': {}}))
  with pytest.raises(HetjaxError, match='host must be a string'):
    get_cluster(str(p))
  with pytest.raises(HetjaxError, match='has 16 devices'):
    get_cluster('small_lab', 32)


def test_local_cluster_probe():
  c = get_cluster('local', 2)
  assert c.n == 2 and all(c.tflops(i) > 0 for i in range(2)) and c.bandwidth_gbps[0, 1] > 0


COMPACT = {'devices': [{'gpu': 'T4', 'host': 'a', 'region': 'r1', 'count': 2},
                       {'gpu': 'T4', 'host': 'b', 'region': 'r2'}],
           'links': {'intra_host': [0, 100], 'intra_region': [1, 10],
                     'inter_region_default': [50, 1], 'inter_region': {'r1-r2': [20, 2]}}}


def _compact(**group_changes):
  d = json.loads(json.dumps(COMPACT))
  d['devices'][0].update(group_changes)
  return d


@pytest.mark.parametrize('d,msg', [
    (_compact(count=1_000_000), 'count must be <= 1024'),
    (_compact(count=10 ** 12), 'count must be <= 1024'),
    (_compact(per_host=2.5), 'per_host must be an integer'),
    (_compact(tflops=float('nan')), 'tflops must be finite'),
    (_compact(memory_gb=0), 'memory_gb must be > 0'),
    (_compact(mem_bw_gbs=float('inf')), 'mem_bw_gbs must be finite'),
    (_compact(gpu=['T4']), 'gpu must be a string'),
    (dict(COMPACT, devices=['T4']), 'device group 0 must be a JSON object'),
    (dict(COMPACT, links={**COMPACT['links'], 'inter_region': {'r1-mars': [1, 1]}}), "'r2' of the devices"),
    (dict(COMPACT, links={**COMPACT['links'], 'inter_region': {'r1-r2-r3': [1, 1]}}), 'must be "A-B"'),
    (dict(COMPACT, links={'intra_host': [0, -1]}), 'gbps must be > 0'),
    (5, 'must be a JSON object'),
])
def test_bad_cluster_files(d, msg):
  with pytest.raises(HetjaxError, match=msg):
    Cluster.from_dict(d, 'fuzz')


def test_measured_memory_bandwidth_overrides_the_catalog_and_round_trips():
  c = Cluster.from_dict(_compact(mem_bw_gbs=40.0), 'ok')
  assert c.mem_bw_gbs(0) == 40.0 and c.mem_bw_gbs(2) == c.spec(2).mem_bw_gbs != 40.0
  assert Cluster.from_dict(c.to_dict()).mem_bw_gbs(1) == 40.0


def test_compact_cluster_links():
  c = Cluster.from_dict(COMPACT, 'ok')
  assert c.n == 3 and c.bandwidth_gbps[0, 1] == 100 and c.bandwidth_gbps[0, 2] == 2
  assert c.delay_ms[1, 2] == 20
