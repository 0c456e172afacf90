"""TD-MPC2's own DMControl tasks, the ones it publishes results for, defined on dm_control's domains.

TD-MPC2 (``tdmpc2/envs/tasks/*.py``, MIT) adds tasks to five dm_control domains. This module defines the same
bodies and rewards; :func:`custom_task_factories` maps each task name to a function building it.

=========================  ===================================================================================
task                       reward per control step (``tol`` is ``dm_control.utils.rewards.tolerance``)
=========================  ===================================================================================
``walker-walk-backwards``  ``walker-walk``'s, with the speed target at ``-1`` m/s instead of ``+1``
``walker-run-backwards``   ``walker-run``'s, with the speed target at ``-8`` m/s
``cheetah-run-backwards``  ``tol(-speed, (8, inf), margin 8, linear)``: ``cheetah-run`` backwards, at 80 % of
                           its 10 m/s
``hopper-hop-backwards``   standing ``tol(height, (0.6, 2))`` times hopping ``tol(-speed, (1, inf), margin .5,
                           value .5, linear)``: half of ``hopper-hop``'s 2 m/s, backwards
``cheetah-run-front``      ``up * (5 fast + 1) / 6``: ``up = (3 tol(z_bfoot) + 2 tol(z_torso)) / 5`` with
                           ``tol(z) = tol(z, (1.2, inf), margin .6)`` (back foot raised: running on the front
                           legs), ``fast = tol(speed, (6, inf), margin 6, linear)``
``cheetah-run-back``       the same with the front foot raised (running on the back legs)
``cheetah-jump``           ``(5 (tol(h_b) + tol(h_f)) / 2 + still) / 6``: ``h_b`` / ``h_f`` the mean height of
                           the torso and the back / front foot, ``still = tol(speed, (-.5, .5), margin .5,
                           linear)`` (TD-MPC2's mean of its stand-front and stand-back rewards)
``reacher-three-easy``     ``reacher-easy``'s reward and initial states on a three-link arm
``reacher-three-hard``     ``reacher-hard``'s on the three-link arm
``cup-spin``               ``(1 - in_cup) * (far + 2 fast) / 3``: ``far = tol(|ball - cup|, (.5, inf),
                           margin .25, value .5, linear)``, ``fast = tol(|ball velocity|, (6, inf), margin 3,
                           value .5, linear)``; the ball starts in the cup, or, in 10 % of the episodes, anywhere
``pendulum-spin``          ``tol(|angular velocity|, (9, inf), margin 4.5, value .5, linear)``, from
                           ``pendulum-swingup``'s random initial angle
=========================  ===================================================================================

("linear" is ``sigmoid="linear"``, "value" is ``value_at_margin``; unstated: dm_control's defaults, a Gaussian
with value 0.1 at the margin.) Observations are those of the domain's suite tasks: cheetah 17, reacher-three 8
(3 joint angles, finger-to-target vector, 3 joint velocities), cup 8, pendulum 3.

Bodies are dm_control's models with TD-MPC2's changes, applied to dm_control's own XML when the env is built:
the cheetah's and walker's ground planes are drawn twice as long (MuJoCo planes collide everywhere, so this
only changes what a video shows), and the reacher gets three links instead of two (see
:func:`three_link_reacher_xml`). Cup, pendulum and hopper use dm_control's models unchanged.
``tests/test_envs.py`` compares all of this, compiled model, initial states, steps and rewards, with
TD-MPC2's own definitions when they are at hand.

TD-MPC2 defines further tasks it publishes no results for (cheetah and walker yoga, ``hopper-flip``,
``fish-obstacles``, ``reacher-four-*``, ...); they are not defined here.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Callable

import numpy as np

from dm_control.rl import control
from dm_control.suite import ball_in_cup, base, cheetah, common, hopper, pendulum, reacher, walker
from dm_control.utils import rewards

__all__ = [
    "BackwardsCheetah",
    "BackwardsHopper",
    "BackwardsPlanarWalker",
    "BallInCupSpin",
    "CheetahJump",
    "CheetahRunOnOneFoot",
    "PendulumSpin",
    "custom_task_factories",
    "three_link_reacher_xml",
]

_INF = float("inf")


def _linear(value: float, bounds: tuple[float, float], margin: float, value_at_margin: float = 0.0) -> float:
    """``rewards.tolerance`` with a linear slope, the shape of all of TD-MPC2's speed terms."""
    return rewards.tolerance(value, bounds=bounds, margin=margin, value_at_margin=value_at_margin, sigmoid="linear")


# -- bodies: dm_control's XML with TD-MPC2's changes ---------------------------------------------------------
def _edit(xml: bytes, edit: Callable[[ET.Element], None]) -> bytes:
    root = ET.fromstring(xml)
    edit(root)
    return ET.tostring(root)


def _scale_plane_length(root: ET.Element, geom: str, factor: float) -> None:
    plane = root.find(f".//geom[@name='{geom}']")
    half_length, *rest = plane.get("size").split()
    plane.set("size", " ".join([f"{float(half_length) * factor:g}", *rest]))


def cheetah_xml() -> bytes:
    """dm_control's cheetah with TD-MPC2's ground drawn 200 m long (100 m in dm_control)."""
    return _edit(common.read_model("cheetah.xml"), lambda root: _scale_plane_length(root, "ground", 2))


def walker_xml() -> bytes:
    """dm_control's walker with TD-MPC2's floor drawn 500 m long (250 m in dm_control)."""
    return _edit(common.read_model("walker.xml"), lambda root: _scale_plane_length(root, "floor", 2))


# TD-MPC2's three-link arm: (body, joint range in degrees or None for a free joint, link length, offset of the
# next body). The hand capsule is 10 cm long but the finger sits at 9 cm, as in TD-MPC2's model.
_THREE_LINKS = (("arm0", None, 0.09, 0.09), ("arm1", 80, 0.09, 0.09), ("hand", 80, 0.1, 0.09))
_JOINT_NAMES = {"arm0": "shoulder0", "arm1": "shoulder1", "hand": "wrist"}


def three_link_reacher_xml() -> bytes:
    """dm_control's two-link reacher with the arm replaced by TD-MPC2's three links.

    dm_control's arm is a 12 cm upper arm on a free shoulder and a hand on a wrist limited to +-160 degrees.
    TD-MPC2's has three links of 9 cm: ``arm0`` on a free joint ``shoulder0``, ``arm1`` on ``shoulder1`` and
    ``hand`` on ``wrist`` (both +-80 degrees), the finger 9 cm along the hand, and one motor per joint
    (gear 0.05, as in dm_control). Geoms keep dm_control's materials and radii; the arena, target, finger
    camera and everything else are dm_control's.
    """

    def edit(root: ET.Element) -> None:
        world = root.find("worldbody")
        arm = world.find("body[@name='arm']")
        capsule = dict(arm.find("geom").attrib)  # type, size, material of dm_control's links
        finger = arm.find(".//body[@name='finger']")
        parent, position = world, list(world).index(arm)
        world.remove(arm)
        offset = arm.get("pos")
        for name, degrees, length, next_offset in _THREE_LINKS:
            body = ET.Element("body", name=name, pos=offset)
            ET.SubElement(body, "geom", {**capsule, "name": name, "fromto": f"0 0 0 {length:g} 0 0"})
            joint = {"name": _JOINT_NAMES[name]}
            if degrees is not None:
                joint.update(limited="true", range=f"-{degrees} {degrees}")
            ET.SubElement(body, "joint", joint)
            parent.insert(position, body)
            parent, position, offset = body, len(body), f"{next_offset:g} 0 0"
        finger.set("pos", offset)
        parent.append(finger)

        actuators = root.find("actuator")
        for motor in list(actuators):
            actuators.remove(motor)
        for joint in _JOINT_NAMES.values():
            ET.SubElement(actuators, "motor", name=joint, joint=joint)

    return _edit(common.read_model("reacher.xml"), edit)


# -- rewards -------------------------------------------------------------------------------------------------
class BackwardsPlanarWalker(walker.PlanarWalker):
    """``walker.PlanarWalker`` rewarding speed towards ``-x`` instead of ``+x``."""

    def get_reward(self, physics):
        standing = rewards.tolerance(
            physics.torso_height(), bounds=(walker._STAND_HEIGHT, _INF), margin=walker._STAND_HEIGHT / 2
        )
        upright = (1 + physics.torso_upright()) / 2
        stand_reward = (3 * standing + upright) / 4
        move_reward = _linear(
            -physics.horizontal_velocity(), (self._move_speed, _INF), self._move_speed / 2, value_at_margin=0.5
        )
        return stand_reward * (5 * move_reward + 1) / 6


class BackwardsCheetah(cheetah.Cheetah):
    """``cheetah.Cheetah`` rewarding running towards ``-x`` at ``speed`` (TD-MPC2: 80 % of the forward 10 m/s)."""

    def __init__(self, speed: float = 0.8 * cheetah._RUN_SPEED, random=None):
        super().__init__(random=random)
        self._speed = speed

    def get_reward(self, physics):
        return _linear(-physics.speed(), (self._speed, _INF), self._speed)


class BackwardsHopper(hopper.Hopper):
    """``hopper.Hopper`` rewarding hops towards ``-x`` at half of ``hopper-hop``'s speed (TD-MPC2's target)."""

    def __init__(self, random=None):
        super().__init__(hopping=True, random=random)

    def get_reward(self, physics):
        standing = rewards.tolerance(physics.height(), (hopper._STAND_HEIGHT, 2))
        speed = hopper._HOP_SPEED / 2
        return standing * _linear(-physics.speed(), (speed, _INF), speed / 2, value_at_margin=0.5)


# TD-MPC2's height a cheetah part counts as "up" at (1.2 m; full reward above, Gaussian margin of 0.6 m below).
_CHEETAH_UP_HEIGHT = 1.2


def _cheetah_up(height: float) -> float:
    return rewards.tolerance(height, bounds=(_CHEETAH_UP_HEIGHT, _INF), margin=_CHEETAH_UP_HEIGHT / 2)


def _height(physics, body: str) -> float:
    return physics.named.data.xpos[body, "z"]


class CheetahRunOnOneFoot(cheetah.Cheetah):
    """Cheetah running forwards with one foot (``raised_foot``: ``"bfoot"`` or ``"ffoot"``) and its torso up.

    ``raised_foot="bfoot"`` is TD-MPC2's ``cheetah-run-front`` (on the front legs), ``"ffoot"`` its
    ``cheetah-run-back``; the speed target is 60 % of ``cheetah-run``'s 10 m/s.
    """

    def __init__(self, raised_foot: str, speed: float = 0.6 * cheetah._RUN_SPEED, random=None):
        super().__init__(random=random)
        self._raised_foot, self._speed = raised_foot, speed

    def get_reward(self, physics):
        up = (3 * _cheetah_up(_height(physics, self._raised_foot)) + 2 * _cheetah_up(_height(physics, "torso"))) / 5
        fast = _linear(physics.speed(), (self._speed, _INF), self._speed)
        return up * (5 * fast + 1) / 6


class CheetahJump(cheetah.Cheetah):
    """Cheetah standing up on either foot, high, without moving off (TD-MPC2's ``cheetah-jump``)."""

    _MAX_SPEED = 0.5  # m/s either way at which the "stay in place" term reaches 0

    def get_reward(self, physics):
        torso = _height(physics, "torso")
        high = [_cheetah_up((torso + _height(physics, foot)) / 2) for foot in ("bfoot", "ffoot")]
        still = _linear(physics.speed(), (-self._MAX_SPEED, self._MAX_SPEED), self._MAX_SPEED)
        return (5 * sum(high) / 2 + still) / 6


class BallInCupSpin(ball_in_cup.BallInCup):
    """Swing the ball around the cup, far from it and fast (TD-MPC2's ``cup-spin``)."""

    _FAR = 0.5  # m from the cup's target site
    _FAST = 6.0  # m/s of the ball
    _START_ANYWHERE = 0.1  # share of episodes whose ball may start outside the cup

    def initialize_episode(self, physics):
        # A ball position without contacts, inside the cup except in 10 % of the episodes (drawn first).
        anywhere = self.random.uniform() < self._START_ANYWHERE
        while True:
            physics.named.data.qpos["ball_x"] = self.random.uniform(-0.2, 0.2)
            physics.named.data.qpos["ball_z"] = self.random.uniform(0.2, 0.5)
            physics.after_reset()
            if physics.data.ncon == 0 and (anywhere or physics.in_target()):
                break
        base.Task.initialize_episode(self, physics)  # skips BallInCup's own ball placement

    def get_reward(self, physics):
        distance = np.linalg.norm(physics.ball_to_target())
        speed = np.linalg.norm(physics.named.data.qvel[["ball_x", "ball_z"]])
        far = _linear(distance, (self._FAR, _INF), self._FAR / 2, value_at_margin=0.5)
        fast = _linear(speed, (self._FAST, _INF), self._FAST / 2, value_at_margin=0.5)
        return (1 - physics.in_target()) * (far + 2 * fast) / 3


class PendulumSpin(pendulum.SwingUp):
    """Spin the pendulum at 9 rad/s or more, either way (TD-MPC2's ``pendulum-spin``)."""

    _SPEED = 9.0

    def get_reward(self, physics):
        return _linear(abs(float(physics.angular_velocity()[0])), (self._SPEED, _INF), self._SPEED / 2, 0.5)


# -- factories: (time_limit, random) -> control.Environment, control timesteps as in the suite ---------------
def _walker_backwards(speed: float) -> Callable[..., control.Environment]:
    def load(time_limit, random):
        physics = walker.Physics.from_xml_string(walker_xml(), common.ASSETS)
        task = BackwardsPlanarWalker(move_speed=speed, random=random)
        return control.Environment(physics, task, time_limit=time_limit, control_timestep=walker._CONTROL_TIMESTEP)

    return load


def _cheetah(make_task: Callable[..., base.Task]) -> Callable[..., control.Environment]:
    def load(time_limit, random):
        physics = cheetah.Physics.from_xml_string(cheetah_xml(), common.ASSETS)
        return control.Environment(physics, make_task(random=random), time_limit=time_limit)

    return load


def _hopper_hop_backwards(time_limit, random) -> control.Environment:
    physics = hopper.Physics.from_xml_string(*hopper.get_model_and_assets())
    task = BackwardsHopper(random=random)
    return control.Environment(physics, task, time_limit=time_limit, control_timestep=hopper._CONTROL_TIMESTEP)


def _reacher_three(target_size: float) -> Callable[..., control.Environment]:
    def load(time_limit, random):
        physics = reacher.Physics.from_xml_string(three_link_reacher_xml(), common.ASSETS)
        return control.Environment(physics, reacher.Reacher(target_size, random=random), time_limit=time_limit)

    return load


def _cup_spin(time_limit, random) -> control.Environment:
    physics = ball_in_cup.Physics.from_xml_string(*ball_in_cup.get_model_and_assets())
    task = BallInCupSpin(random=random)
    return control.Environment(physics, task, time_limit=time_limit, control_timestep=ball_in_cup._CONTROL_TIMESTEP)


def _pendulum_spin(time_limit, random) -> control.Environment:
    physics = pendulum.Physics.from_xml_string(*pendulum.get_model_and_assets())
    return control.Environment(physics, PendulumSpin(random=random), time_limit=time_limit)


def custom_task_factories() -> dict[str, Callable[..., control.Environment]]:
    """Task name -> ``factory(time_limit, random)`` returning the dm_control environment."""
    return {
        "walker-walk-backwards": _walker_backwards(walker._WALK_SPEED),
        "walker-run-backwards": _walker_backwards(walker._RUN_SPEED),
        "cheetah-run-backwards": _cheetah(BackwardsCheetah),
        "hopper-hop-backwards": _hopper_hop_backwards,
        "cheetah-run-front": _cheetah(lambda random: CheetahRunOnOneFoot("bfoot", random=random)),
        "cheetah-run-back": _cheetah(lambda random: CheetahRunOnOneFoot("ffoot", random=random)),
        "cheetah-jump": _cheetah(CheetahJump),
        "reacher-three-easy": _reacher_three(reacher._BIG_TARGET),
        "reacher-three-hard": _reacher_three(reacher._SMALL_TARGET),
        "cup-spin": _cup_spin,
        "pendulum-spin": _pendulum_spin,
    }
