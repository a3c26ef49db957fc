"""Butcher tableaux of the explicit Runge–Kutta methods the engine runs (fixed and embedded).

An ``s``-stage explicit method advances ``dy/dt = f(t, y)`` by one step ``h`` as::

    k_i = f(t + c_i h, Y_i),   Y_i = y + h sum_{j<i} a_ij k_j,   y' = y + h sum_i b_i k_i

(Hairer, Nørsett & Wanner, *Solving Ordinary Differential Equations I*, §II.1, eq. 1.8). An
embedded pair adds error weights ``e = b - b_hat`` (``err = h sum_i e_i k_i``, the difference to
a lower-order solution, §II.4); FSAL methods ("first same as last") have a last stage with
``c = 1`` and ``a_s = b``, whose derivative ``f(t + h, y')`` is the next step's first stage.
Dense output writes the solution inside a step as ``y(t + theta h) = y + h sum_i w_i(theta) k_i``
with ``w_i(theta) = sum_m P_im theta^(m+1)`` (§II.6): each embedded pair's own continuous
extension (bosh3's cubic, dopri5's quartic of Shampine 1986, tsit5's free quartic of Tsitouras
2011, dop853's seventh-order one with three extra stages), evaluated by ``genflow.engine.dense``.

``TABLEAUX`` maps the engine's ODE solver names to tableaux; ``gf.solve`` and the diffusion
Runge–Kutta solvers (``genflow.solvers.runge_kutta``, ``RK45``) run them through one engine
(``genflow.engine.rk``).
"""
from typing import NamedTuple, Optional, Tuple

__all__ = ["ButcherTableau", "TABLEAUX"]


class ButcherTableau(NamedTuple):
    """An explicit Runge–Kutta method (see the module doc for the equations).

    Attributes:
        name: registry name.  order: order of the propagated solution ``b``.
        c (s floats), a (s rows, row i holding a_i0 .. a_i,i-1), b (s floats).
        error (s floats or None): ``e = b - b_hat`` of the embedded pair.
        error_order: order of the embedded solution (the controller's exponent is
            ``1 / (error_order + 1)``).
        error3 (s floats or None): DOP853's second, third-order error weights (its error norm
            is ``|err5|^2 / sqrt(|err5|^2 + 0.01 |err3|^2)``, Hairer's code).
        fsal: the last stage is ``f(t + h, y')`` (``a[-1] == b``, ``c[-1] == 1``).
        dense (s + e rows of m floats or None): ``P`` of the method's continuous extension
            (``w_i(theta) = sum_m P_im theta^(m+1)``), over the stages and the ``e`` extra ones.
        peer: the equivalent in torchdiffeq / scipy / diffrax.  reference: the paper.
        dense_stages (``(c, a)`` or None): the extra stages the dense output evaluates after an
            accepted step (``c``: e floats; ``a``: e rows over all earlier stages).
    """

    name: str
    order: int
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    error: Optional[Tuple[float, ...]] = None
    error_order: Optional[int] = None
    error3: Optional[Tuple[float, ...]] = None
    fsal: bool = False
    dense: Optional[Tuple[Tuple[float, ...], ...]] = None
    peer: str = ""
    reference: str = ""
    dense_stages: Optional[Tuple[Tuple[float, ...], Tuple[Tuple[float, ...], ...]]] = None

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def nfe_per_step(self) -> int:
        """Derivative evaluations per step (an FSAL method's last stage is the next step's first)."""
        return self.stages - 1 if self.fsal else self.stages

    @property
    def adaptive(self) -> bool:
        """Whether the method has an embedded error estimate (usable with rtol/atol)."""
        return self.error is not None


def _lower(rows):
    """Dense lower-triangular rows from ``{j: a_ij}`` dicts (row 0 is empty)."""
    return ((),) + tuple(tuple(row.get(j, 0.0) for j in range(i)) for i, row in enumerate(rows, start=1))


def _padded(weights: dict, stages: int) -> Tuple[float, ...]:
    return tuple(weights.get(j, 0.0) for j in range(stages))


_HNW = "Hairer, Nørsett & Wanner, Solving ODEs I"

EULER = ButcherTableau("euler", 1, (0.0,), ((),), (1.0,), peer="torchdiffeq 'euler', diffrax Euler",
                       reference=f"Euler 1768; {_HNW}, §II.1")
MIDPOINT = ButcherTableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0),
                          peer="torchdiffeq 'midpoint', diffrax Midpoint", reference=f"Runge 1895; {_HNW}, eq. 1.7")
HEUN = ButcherTableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5), peer="torchdiffeq 'heun2'/'adaptive_heun', diffrax Heun",
                      reference=f"Heun 1900; {_HNW}, Table II.1.1")
RALSTON = ButcherTableau("ralston", 2, (0.0, 2 / 3), ((), (2 / 3,)), (0.25, 0.75), peer="diffrax Ralston",
                         reference="Ralston 1962, Runge–Kutta methods with minimum error bounds, eq. 3.5")
RK4 = ButcherTableau("rk4", 4, (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                     (1 / 6, 1 / 3, 1 / 3, 1 / 6), peer="torchdiffeq 'rk4'",
                     reference=f"Kutta 1901; {_HNW}, Table II.1.2")
RK4_38 = ButcherTableau("rk4_38", 4, (0.0, 1 / 3, 2 / 3, 1.0), ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                        (1 / 8, 3 / 8, 3 / 8, 1 / 8), peer="torchdiffeq 'rk4' (its default fourth-order method)",
                        reference=f"Kutta 1901 (the 3/8 rule); {_HNW}, Table II.1.2")
BOSH3 = ButcherTableau(
    "bosh3", 3, (0.0, 0.5, 0.75, 1.0), ((), (0.5,), (0.0, 0.75), (2 / 9, 1 / 3, 4 / 9)), (2 / 9, 1 / 3, 4 / 9, 0.0),
    error=(-5 / 72, 1 / 12, 1 / 9, -1 / 8), error_order=2, fsal=True,
    dense=((1.0, -4 / 3, 5 / 9), (0.0, 1.0, -2 / 3), (0.0, 4 / 3, -8 / 9), (0.0, -1.0, 1.0)),
    peer="torchdiffeq 'bosh3', scipy RK23, diffrax Bosh3",
    reference="Bogacki & Shampine 1989, A 3(2) pair of Runge–Kutta formulas, Appl. Math. Lett. 2(4)")
_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DOPRI5 = ButcherTableau(
    "dopri5", 5, (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
     (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656), _DOPRI5_B[:6]),
    _DOPRI5_B, error=(71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40), error_order=4,
    fsal=True,
    # Shampine (1986), Some practical Runge-Kutta formulas, Math. Comp. 46: the quartic extension
    dense=((1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432),
           (0.0, 0.0, 0.0, 0.0),
           (0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799),
           (0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072),
           (0.0, 127303824393 / 49829197408, -318862633887 / 49829197408, 701980252875 / 199316789632),
           (0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844),
           (0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423)),
    peer="torchdiffeq 'dopri5', scipy RK45, diffrax Dopri5",
    reference=f"Dormand & Prince 1980, A family of embedded Runge–Kutta formulae, J. Comp. Appl. Math. 6, "
              f"Table 2; {_HNW}, Table II.5.2")
_TSIT5_B = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
            2.324710524099774, 0.0)
TSIT5 = ButcherTableau(
    "tsit5", 5, (0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    ((), (0.161,), (-0.008480655492356989, 0.335480655492357),
     (2.897153057105493, -6.359448489975075, 4.3622954328695815),
     (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
     (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383),
     _TSIT5_B[:6]),
    _TSIT5_B,
    error=(0.0017800110522257773, 0.0008164344596567463, -0.007880878010261994, 0.14471100717326298,
           -0.5823571654525552, 0.45808210592918685, -1 / 66),
    error_order=4, fsal=True,
    # the free quartic interpolant b_i(theta) (Tsitouras 2011, §4; the coefficients of OrdinaryDiffEq.jl's
    # Tsit5 interpolation and diffrax's _Tsit5Interpolation, expanded in powers of theta)
    dense=((1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216),
           (0.0, 0.13169999999999998, -0.2234, 0.1017),
           (0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253),
           (0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902),
           (0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928),
           (0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661),
           (0.0, 1.5, -4.0, 2.5)),
    peer="diffrax Tsit5 (OrdinaryDiffEq.jl Tsit5)",
    reference="Tsitouras 2011, Runge–Kutta pairs of order 5(4) satisfying only the first column simplifying "
              "assumption, Comput. Math. Appl. 62, Table 1")
_DOP853_A = (
    {0: 0.05260015195876773},
    {0: 0.0197250569845379, 1: 0.0591751709536137},
    {0: 0.02958758547680685, 2: 0.08876275643042054},
    {0: 0.2413651341592667, 2: -0.8845494793282861, 3: 0.924834003261792},
    {0: 0.037037037037037035, 3: 0.17082860872947386, 4: 0.12546768756682242},
    {0: 0.037109375, 3: 0.17025221101954405, 4: 0.06021653898045596, 5: -0.017578125},
    {0: 0.03709200011850479, 3: 0.17038392571223998, 4: 0.10726203044637328, 5: -0.015319437748624402,
     6: 0.008273789163814023},
    {0: 0.6241109587160757, 3: -3.3608926294469414, 4: -0.868219346841726, 5: 27.59209969944671,
     6: 20.154067550477894, 7: -43.48988418106996},
    {0: 0.47766253643826434, 3: -2.4881146199716677, 4: -0.590290826836843, 5: 21.230051448181193,
     6: 15.279233632882423, 7: -33.28821096898486, 8: -0.020331201708508627},
    {0: -0.9371424300859873, 3: 5.186372428844064, 4: 1.0914373489967295, 5: -8.149787010746927,
     6: -18.52006565999696, 7: 22.739487099350505, 8: 2.4936055526796523, 9: -3.0467644718982196},
    {0: 2.273310147516538, 3: -10.53449546673725, 4: -2.0008720582248625, 5: -17.9589318631188,
     6: 27.94888452941996, 7: -2.8589982771350235, 8: -8.87285693353063, 9: 12.360567175794303,
     10: 0.6433927460157636},
    {0: 0.054293734116568765, 5: 4.450312892752409, 6: 1.8915178993145003, 7: -5.801203960010585,
     8: 0.3111643669578199, 9: -0.1521609496625161, 10: 0.20136540080403034, 11: 0.04471061572777259},
)
# DOP853's dense output (Hairer, Nørsett & Wanner I, §II.6 and Hairer's code DOP853 / CONTD8):
# three extra stages (c, a over the 12 stages, the FSAL stage f(t + h, y') and earlier extras) ...
_DOP853_DENSE_C = (0.1, 0.2, 0.7777777777777778)
_DOP853_DENSE_A = (
    {0: 0.056167502283047954, 6: 0.25350021021662483, 7: -0.2462390374708025, 8: -0.12419142326381637,
     9: 0.15329179827876568, 10: 0.00820105229563469, 11: 0.007567897660545699, 12: -0.008298},
    {0: 0.03183464816350214, 5: 0.028300909672366776, 6: 0.053541988307438566, 7: -0.05492374857139099,
     10: -0.00010834732869724932, 11: 0.0003825710908356584, 12: -0.00034046500868740456, 13: 0.1413124436746325},
    {0: -0.42889630158379194, 5: -4.697621415361164, 6: 7.683421196062599, 7: 4.06898981839711,
     8: 0.3567271874552811, 12: -0.0013990241651590145, 13: 2.9475147891527724, 14: -9.15095847217987},
)
# ... and the rows D of the code's coefficients d_4..d_7 of y(theta) = y + theta (F_0 + (1 - theta) (F_1 + theta
# (F_2 + (1 - theta) (F_3 + theta (F_4 + (1 - theta) (F_5 + theta F_6)))))) with F_0 = y' - y,
# F_1 = h k_1 - F_0, F_2 = 2 F_0 - h (k_1 + k_13), F_{3+i} = h sum_j D_ij k_j (scipy's dop853_coefficients.D)
_DOP853_DENSE_D = (
    {0: -8.428938276109013, 5: 0.5667149535193777, 6: -3.0689499459498917, 7: 2.38466765651207,
     8: 2.117034582445028, 9: -0.871391583777973, 10: 2.2404374302607883, 11: 0.6315787787694688,
     12: -0.08899033645133331, 13: 18.148505520854727, 14: -9.194632392478356, 15: -4.436036387594894},
    {0: 10.427508642579134, 5: 242.28349177525817, 6: 165.20045171727028, 7: -374.5467547226902,
     8: -22.113666853125306, 9: 7.733432668472264, 10: -30.674084731089398, 11: -9.332130526430229,
     12: 15.697238121770845, 13: -31.139403219565178, 14: -9.35292435884448, 15: 35.81684148639408},
    {0: 19.985053242002433, 5: -387.0373087493518, 6: -189.17813819516758, 7: 527.8081592054236,
     8: -11.57390253995963, 9: 6.8812326946963, 10: -1.0006050966910838, 11: 0.7777137798053443,
     12: -2.778205752353508, 13: -60.19669523126412, 14: 84.32040550667716, 15: 11.99229113618279},
    {0: -25.69393346270375, 5: -154.18974869023643, 6: -231.5293791760455, 7: 357.6391179106141,
     8: 93.40532418362432, 9: -37.45832313645163, 10: 104.0996495089623, 11: 29.8402934266605,
     12: -43.53345659001114, 13: 96.32455395918828, 14: -39.17726167561544, 15: -149.72683625798564},
)


def _nested_dense(b: Tuple[float, ...], rows) -> Tuple[Tuple[float, ...], ...]:
    """``P`` (16 rows of theta^1..theta^7 weights) of DOP853's nested dense-output formula above:
    each ``F_i`` is ``h sum_j f_ij k_j`` and enters multiplied by the polynomial ``g_i(theta)``
    (``theta``, ``theta (1 - theta)``, ``theta^2 (1 - theta)``, ...)."""
    stages = 16
    b = b + (0.0,) * (stages - len(b))
    unit = [1.0 if j == 0 else 0.0 for j in range(stages)]
    last = [1.0 if j == 12 else 0.0 for j in range(stages)]
    f = [list(b), [u - x for u, x in zip(unit, b)], [2 * x - u - v for x, u, v in zip(b, unit, last)]]
    f += [[row.get(j, 0.0) for j in range(stages)] for row in rows]
    g, poly = [0.0, 1.0], []  # g_0 = theta, coefficients of theta^0.., then times (1 - theta) or theta in turn
    for i in range(len(f)):
        poly.append(g + [0.0] * (8 - len(g)))
        g = [a - c for a, c in zip(g + [0.0], [0.0] + g)] if i % 2 == 0 else [0.0] + g
    return tuple(tuple(sum(f[i][j] * poly[i][m] for i in range(len(f))) for m in range(1, 8)) for j in range(stages))


DOP853 = ButcherTableau(
    "dop853", 8,
    (0.0, 0.05260015195876773, 0.0789002279381516, 0.1183503419072274, 0.2816496580927726, 1 / 3, 0.25,
     0.3076923076923077, 0.6512820512820513, 0.6, 0.8571428571428571, 1.0, 1.0),
    _lower(_DOP853_A), _padded(_DOP853_A[-1], 13),
    error=_padded({0: 0.01312004499419488, 5: -1.2251564463762044, 6: -0.4957589496572502, 7: 1.6643771824549864,
                   8: -0.35032884874997366, 9: 0.3341791187130175, 10: 0.08192320648511571,
                   11: -0.022355307863886294}, 13),
    error_order=7,
    error3=_padded({0: -0.18980075407240762, 5: 4.450312892752409, 6: 1.8915178993145003, 7: -5.801203960010585,
                    8: -0.4226823213237919, 9: -0.1521609496625161, 10: 0.20136540080403034,
                    11: 0.02265179219836082}, 13),
    fsal=True, dense=_nested_dense(_padded(_DOP853_A[-1], 12), _DOP853_DENSE_D),
    peer="scipy DOP853, torchdiffeq 'dopri8' (a different 8(7) pair)",
    reference=f"Prince & Dormand 1981, High order embedded Runge–Kutta formulae, J. Comp. Appl. Math. 7; "
              f"{_HNW}, §II.10 (DOP853, with the 5th/3rd-order error estimate and the 7th-order dense output "
              f"of Hairer's code)",
    dense_stages=(_DOP853_DENSE_C, tuple(_padded(row, 13 + i) for i, row in enumerate(_DOP853_DENSE_A))))

TABLEAUX = {t.name: t for t in (EULER, MIDPOINT, HEUN, RALSTON, RK4, RK4_38, BOSH3, TSIT5, DOPRI5, DOP853)}
