"""All-or-nothing changes of a MRML scene: what a failed or cancelled registration rolls back."""

import slicer

OUTPUT_ATTRIBUTE = "TextSCF.Output"


def nodeIds(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def removeNewNodes(scene, nodeIdsBefore):
    """Remove the nodes added to the scene since ``nodeIdsBefore`` (newest first).

    Removing a node may remove others with it (display nodes), so the list is taken first and each node is removed
    only if it is still in the scene.
    """
    newNodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    newNodes = [node for node in newNodes if node is not None and node.GetID() not in nodeIdsBefore]
    for node in reversed(newNodes):
        if node.GetScene() is scene:
            scene.RemoveNode(node)


class SceneChanges:
    """Records changes to a scene and undoes them all when the ``with`` block fails (or is cancelled).

    New nodes are removed, the content (and display) of given nodes restored from a copy taken before the first
    change, parent transforms, node references and the ``TextSCF.Output`` attribute set back.
    """

    def __init__(self, scene):
        self.scene = scene
        self._nodeIdsBefore = nodeIds(scene)
        self._backups = []     # (node, copy of its content before we changed it)
        self._undo = []        # (node, callable) restoring parents, references, attributes (run newest first)

    def __enter__(self):
        return self

    def __exit__(self, excType, exc, traceback):
        if excType is not None:
            self.rollBack()
        return False

    def node(self, node, className, name):
        """``node`` (its content saved first, to restore on failure), or a new node of ``className`` named ``name``."""
        if node is None:
            return self.scene.AddNewNodeByClass(className, self.scene.GenerateUniqueName(name))
        self._backup(node)
        displayNode = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
        if displayNode is not None:
            self._backup(displayNode)
        return node

    def _backup(self, node):
        backup = getattr(slicer, node.GetClassName())()
        backup.CopyContent(node)
        self._backups.append((node, backup))

    def setReference(self, node, role, nodeId):
        previousId = node.GetNodeReferenceID(role)
        self._undo.append((node, lambda: node.SetNodeReferenceID(role, previousId)))
        node.SetNodeReferenceID(role, nodeId)

    def markOutput(self, node, kind):
        previous = node.GetAttribute(OUTPUT_ATTRIBUTE)
        self._undo.append((node, lambda: node.RemoveAttribute(OUTPUT_ATTRIBUTE) if previous is None
                           else node.SetAttribute(OUTPUT_ATTRIBUTE, previous)))
        node.SetAttribute(OUTPUT_ATTRIBUTE, kind)

    def setParent(self, node, transformId):
        previousId = node.GetTransformNodeID()
        if previousId != transformId:
            self._undo.append((node, lambda: node.SetAndObserveTransformNodeID(previousId)))
            node.SetAndObserveTransformNodeID(transformId)

    def rollBack(self):
        """Leave the scene as it was: changes undone, new nodes out, given nodes back to their content."""
        for node, undo in reversed(self._undo):
            if node.GetScene() is not None:
                undo()
        removeNewNodes(self.scene, self._nodeIdsBefore)
        for node, backup in reversed(self._backups):
            if node.GetScene() is not None:
                node.CopyContent(backup)
