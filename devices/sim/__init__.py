"""Cardiac ultrasound simulator: a phased-array probe on a seeded, beating 3D heart phantom.

Public API:
    SimulatedProbe(patient_seed=0, settings=None, start_pose=None, start_view="A4C", fps=30, realtime=True)
    ScanSettings(depth_mm, sector_deg, size_px, gain_db, dynamic_range_db, frequency_mhz, ...)
    Patient, make_patient(seed)
    from_spec("seed=3,view=A4C,fps=30")  (registry spec `sim:...`)
Pose conventions: devices/sim/pose.py. Label definitions: devices/sim/probe.py.
"""
from devices.sim.anatomy import Patient, make_patient
from devices.sim.probe import SimSpecError, SimulatedProbe, from_spec
from devices.sim.render import ScanSettings

__all__ = ["Patient", "ScanSettings", "SimSpecError", "SimulatedProbe", "from_spec", "make_patient"]
