"""How results are shown: the statistics table and the Jacobian colour table and display."""

import vtk

# Jacobian display: a 256-entry table stretched over the window [JACOBIAN_DISPLAY_MIN, JACOBIAN_DISPLAY_MAX]. Entry i
# is centred on |J| = i * JACOBIAN_BIN (bin width 2/255), so entry 0 holds |J| <= 0 (folding, bright green; values
# below the window clamp to it, and it also takes 0 < |J| < 1/255), |J| = 1 falls between entries 127 and 128 (both
# white, the window's centre), values below 1 fade to blue and values above 1 to red, saturating at 2.
JACOBIAN_TABLE_SIZE = 256
JACOBIAN_BIN = 2.0 / 255.0
JACOBIAN_DISPLAY_MIN = -0.5 * JACOBIAN_BIN
JACOBIAN_DISPLAY_MAX = 2.0 + 0.5 * JACOBIAN_BIN
JACOBIAN_FOLDING_COLOR = (0.0, 1.0, 0.0)
JACOBIAN_LOW_COLOR = (0.23, 0.30, 0.75)   # |J| -> 0: compression
JACOBIAN_HIGH_COLOR = (0.71, 0.02, 0.15)  # |J| -> 2: expansion
JACOBIAN_COLOR_NODE_NAME = "TextSCF Jacobian"

# Stats table columns
TABLE_COLUMNS = (("Measure", "string"), ("Region", "string"), ("Value", "double"), ("Before", "double"),
                 ("Note", "string"))


def jacobianColors():
    """RGB of the 256 entries of the Jacobian table and the Jacobian value at the centre of each entry."""
    colors, centres = [], []
    for index in range(JACOBIAN_TABLE_SIZE):
        centre = JACOBIAN_DISPLAY_MIN + (index + 0.5) * JACOBIAN_BIN
        centres.append(centre)
        if index == 0:
            colors.append(JACOBIAN_FOLDING_COLOR)
        elif centre < 1.0:
            t = 1.0 - max(0.0, centre)  # 0 at |J| = 1, 1 at |J| = 0
            colors.append(tuple(1.0 + t * (c - 1.0) for c in JACOBIAN_LOW_COLOR))
        else:
            t = min(1.0, centre - 1.0)  # 0 at |J| = 1, 1 at |J| = 2
            colors.append(tuple(1.0 + t * (c - 1.0) for c in JACOBIAN_HIGH_COLOR))
    return colors, centres


def jacobianColorNode(scene):
    """The diverging Jacobian colour table (blue < 1 < red, white at 1, green for |J| <= 0); made once per scene."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if node.GetAttribute("TextSCF.ColorTable") == "Jacobian":
            return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", JACOBIAN_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(JACOBIAN_TABLE_SIZE)
    colors, centres = jacobianColors()
    for index, (rgb, centre) in enumerate(zip(colors, centres)):
        name = "folding |J| <= 0" if index == 0 else f"|J| {centre:.3f}"
        node.SetColor(index, name, rgb[0], rgb[1], rgb[2], 1.0)
    node.SetAttribute("TextSCF.ColorTable", "Jacobian")
    node.SetAttribute("Category", "TextSCF")
    node.SetDescription("Jacobian determinant: blue < 1 (compression) < white at 1 < red (expansion), "
                        "bright green where |J| <= 0 (folding)")
    return node


def setupJacobianDisplay(jacobianNode, colorNode):
    """Show the Jacobian with the diverging table, window fixed so that |J| = 1 is white."""
    displayNode = jacobianNode.GetDisplayNode()
    if displayNode is None:
        jacobianNode.CreateDefaultDisplayNodes()
        displayNode = jacobianNode.GetDisplayNode()
    displayNode.SetAndObserveColorNodeID(colorNode.GetID())
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevelMinMax(JACOBIAN_DISPLAY_MIN, JACOBIAN_DISPLAY_MAX)
    displayNode.SetInterpolate(False)


def statsRows(stats, regionNames=()):
    """Rows (measure, region, value, before, note) of the statistics table."""
    nan = float("nan")

    def number(value):
        return nan if value is None else float(value)

    rows = [
        ("SDlogJ", "", number(stats.get("sdlogj")), nan, "std of log |J| (Learn2Reg)"),
        ("Folding |J| <= 0 (%)", "", number(stats.get("folding_percent")), nan, "percent of fixed voxels"),
        ("Jacobian min", "", number(stats.get("jacobian_min")), nan, ""),
        ("Jacobian max", "", number(stats.get("jacobian_max")), nan, ""),
        ("Max displacement (mm)", "", number(stats.get("max_displacement_mm")), nan, ""),
        ("Run time (s)", "", number(stats.get("seconds_total")), nan, ""),
    ]
    for stage, seconds in (stats.get("seconds_per_stage") or {}).items():
        rows.append((f"Run time: {stage} (s)", "", number(seconds), nan, ""))
    rows.append(("Device", "", nan, nan, str(stats.get("device", ""))))
    for key, measure in (("device_note", "Device note"), ("initial_alignment", "Initial alignment")):
        if stats.get(key):
            rows.append((measure, "", nan, nan, str(stats[key])))
    for note in stats.get("notes") or ():
        rows.append(("Note", "", nan, nan, str(note)))
    return rows + _overlapRows(stats, regionNames, number)


def _overlapRows(stats, regionNames, number):
    """Dice and HD95 rows, per region (in the regions' order) and their mean, after and before."""
    rows = []
    ordered = list(regionNames[1:]) if regionNames else []
    for key, measure in (("dice", "Dice"), ("hd95_mm", "HD95 (mm)")):
        after = stats.get(key) or {}
        before = stats.get(f"{key}_before") or {}
        names = [n for n in ordered if n in after or n in before]
        names += [n for n in list(after) + list(before) if n not in names]
        for name in dict.fromkeys(names):
            rows.append((measure, name, number(after.get(name)), number(before.get(name)), ""))
        if f"mean_{key}" in stats or f"mean_{key}_before" in stats:
            rows.append((measure, "mean", number(stats.get(f"mean_{key}")), number(stats.get(f"mean_{key}_before")),
                         "mean over regions"))
    return rows


def fillStatsTable(tableNode, stats, regionNames=()):
    """Columns Measure, Region, Value, Before (Dice/HD95 before registration), Note."""
    rows = statsRows(stats, regionNames)
    table = vtk.vtkTable()
    for column, (name, kind) in enumerate(TABLE_COLUMNS):
        array = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
        array.SetName(name)
        for row in rows:
            array.InsertNextValue(row[column])
        table.AddColumn(array)
    tableNode.SetAndObserveTable(table)
    if hasattr(tableNode, "SetUseColumnTitleAsColumnHeader"):  # column titles default to the names
        tableNode.SetUseColumnTitleAsColumnHeader(True)
    tableNode.SetColumnDescription("Value", "after registration")
    tableNode.SetColumnDescription("Before", "before registration (Dice and HD95 only)")
    return tableNode
