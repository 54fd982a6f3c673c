"""Regenerate the SBML test files (run once; the .xml files are committed).

Written with antimony, then edited with libsbml where antimony cannot express
the construct (local parameters, fast reactions, Level 2).
"""
import antimony
import libsbml


def ant(text, name):
    antimony.clearPreviousLoads()
    if antimony.loadAntimonyString(text) < 0:
        raise RuntimeError(antimony.getLastError())
    doc = libsbml.readSBMLFromString(antimony.getSBMLString(name))
    return doc


def localize(doc, rid, pid):
    m = doc.getModel()
    p = m.getParameter(pid)
    kl = m.getReaction(rid).getKineticLaw()
    lp = kl.createLocalParameter()
    lp.setId(pid)
    lp.setValue(p.getValue())
    if p.isSetUnits():
        lp.setUnits(p.getUnits())
    m.removeParameter(pid)


def save(doc, path):
    doc.checkConsistency()
    errs = [doc.getError(i).getMessage() for i in range(doc.getNumErrors())
            if doc.getError(i).getSeverity() >= libsbml.LIBSBML_SEV_ERROR]
    assert not errs, (path, errs)
    libsbml.writeSBMLToFile(doc, path)


REACTIONS = """
model reactions
  unit substance = mole
  unit volume = litre
  unit time_unit = second
  unit per_second = 1 / second
  unit litre_per_mole_second = litre / (mole * second)
  unit molar = mole / litre
  compartment C = 2.5
  C has volume
  species A in C = 10
  species B in C = 0
  substanceOnly species D in C = 1
  species $S0 in C = 3
  A has molar; B has molar; S0 has molar; D has substance
  J0: $S0 -> A; C*kin*S0
  J1: 2A -> B; C*k1*A*A
  J2: B -> 3 D; C*k2*B
  J3: D -> ; kd*D
  kin = 0.5; kin has per_second
  k1 = 0.02; k1 has litre_per_mole_second
  k2 = 0.4; k2 has per_second
  kd = 0.15; kd has per_second
end
"""

RULES = """
function hillf(x, k, n)
  x^n / (k^n + x^n)
end

model rules
  compartment V = 2
  species X in V
  species $Y in V
  J1: X -> ; kdeg*X*V
  J2: -> X; V*vmax*hillf(Y, K, 2)
  Y' = piecewise(0.5, time < 3 && X > 0.01, -0.1*Y)
  P' = -kp*P + A1
  A1 := 2*X + sin(time) + abs(X - 1) + exp(-time) * ln(2 + X)
  P = 1; kp = 0.7; vmax = 1.2; K = 0.8; kdeg = 0.3
  Y = 2*K
  X = kdeg*10/V
end
"""

REFUSE = {
    "algebraic.xml": """
model algebraic
  species x = 1
  J: x -> ; k*x
  k = 1
  y = 0.5
  0 = x + y - 1
end
""",
    "delay.xml": """
model delayed
  species x = 1
  J: x -> ; k*delay(x, 1)
  k = 1
end
""",
    "event.xml": """
model withevent
  species x = 1
  J: x -> ; k*x
  k = 1
  E1: at time > 5: k = 2
end
""",
    "fast.xml": """
model fastrx
  species x = 1; species y = 0
  Jfast: x -> y; k*x
  k = 1
end
""",
}

if __name__ == "__main__":
    d = ant(REACTIONS, "reactions")
    localize(d, "J1", "k1")
    localize(d, "J2", "k2")
    save(d, "reactions.xml")
    # the same model in Level 2 Version 4 (initial amounts, L2 local parameters)
    d2 = libsbml.readSBMLFromFile("reactions.xml")
    assert d2.setLevelAndVersion(2, 4, True), "L2V4 conversion failed"
    save(d2, "reactions_l2v4.xml")
    save(ant(RULES, "rules"), "rules.xml")
    for name, text in REFUSE.items():
        doc = ant(text, text.split()[1])
        if name == "fast.xml":
            doc.setLevelAndVersion(3, 1, False)
            doc.getModel().getReaction("Jfast").setFast(True)
        save(doc, name)
