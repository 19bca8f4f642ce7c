"""Extra H/C/N/O training molecules for the demo backbone, beyond ASE's g2 set.

The g2 set alone (57 closed-shell H/C/N/O molecules) was too little chemistry: the
416 k-parameter model trained on it had held-out force errors 1.3-6x the GFN1<->GFN2 gap.
This module enumerates small organic molecules combinatorially -- a substituent R
(alkyl, alkenyl, aryl, cycloalkyl) joined to a functional group X (alcohol, amines,
ether, carbonyls, acid, ester, amide, nitrile, nitro, oxime, ...) -- plus saturated and
aromatic rings, amino acids and polyols, and embeds them in 3-D with RDKit (seeded
ETKDG + MMFF). Nothing here is held out by structure: the held-out molecules are
removed by canonical SMILES, and every aromatic five-membered ring containing oxygen
(furan, oxazole, ...) is excluded so that the held-out furan remains an unseen ring
system. Functional groups of the other held-out molecules (tertiary amine, amide,
ester) do occur in larger molecules, as they would in any general-purpose backbone.

Needs ``rdkit`` (``pip install rdkit``) only to build the data.
"""

from __future__ import annotations

# substituents: SMILES that end on the attachment atom
SUBSTITUENTS = {
    "methyl": "C",
    "ethyl": "CC",
    "propyl": "CCC",
    "isopropyl": "CC(C)",
    "tert-butyl": "CC(C)(C)",
    "vinyl": "C=C",
    "allyl": "C=CC",
    "phenyl": "c1ccccc1",
    "cyclopropyl": "C1CC1",
    "cyclopentyl": "C1CCCC1",
}

# functional groups: SMILES that start on the atom bonded to the substituent
GROUPS = {
    "alkyl": "C",
    "hydroxy": "O",
    "hydroxymethyl": "CO",
    "amino": "N",
    "methylamino": "NC",
    "dimethylamino": "N(C)C",
    "methoxy": "OC",
    "formyl": "C=O",
    "acetyl": "C(C)=O",
    "carboxy": "C(=O)O",
    "methoxycarbonyl": "C(=O)OC",
    "acetoxy": "OC(C)=O",
    "formyloxy": "OC=O",
    "carbamoyl": "C(N)=O",
    "dimethylcarbamoyl": "C(=O)N(C)C",
    "acetamido": "NC(C)=O",
    "formamido": "NC=O",
    "cyano": "C#N",
    "nitro": "[N+](=O)[O-]",
    "oxime": "C=NO",
    "aminomethyl": "CN",
    "hydroxyethyl": "CCO",
}

# rings, heteroaromatics and other small molecules not reachable as R-X
OTHERS = (
    "C1CCCC1", "C1CCCCC1", "C1CCOC1", "C1COCCO1", "C1COCCN1", "C1CCNCC1", "C1CCNC1",
    "O=C1CCCC1", "O=C1CCCCC1", "O=C1CCCN1", "O=C1CCCO1", "C1=CCCC1", "C1=CCCCC1",
    "NC(N)=O", "CN(C)C=O", "NCC(=O)O", "CC(N)C(=O)O", "OCCO", "OCC(O)CO",
    "CC(=O)CC(C)=O", "O=CC=O", "OC(=O)C(=O)O", "NCCN", "NCCO", "COCCOC", "CC(C)=O",
    "c1cnccn1", "c1cncnc1", "c1ccnnc1", "c1c[nH]cn1", "c1cc[nH]n1", "c1ccc2ccccc2c1",
    "Cc1ccccc1C", "Cc1cccc(C)c1", "Cc1ccc(C)cc1", "Oc1ccccc1O", "Nc1ccc(O)cc1",
    "Cc1ccncc1", "Nc1ccccn1", "Oc1ccncc1", "Cc1ccc[nH]1",
    "N#CC#N", "N#CCC#N", "C=CC=O", "C=CC(=O)O", "CC=CC", "C=CC=CC", "C#CC", "C#CCO",
    "CC#N", "O=C=O", "CN=C=O", "NN", "CNN", "NO", "CON", "ON=C", "CC=NO",
)

# held out from training: (canonical SMILES of) the held-out g2 molecules
HELD_OUT_SMILES = {
    "C3H9N": "CN(C)C",  # trimethylamine
    "CH3CONH2": "CC(N)=O",  # acetamide
    "HCOOCH3": "COC=O",  # methyl formate
    "C4H4O": "c1ccoc1",  # furan
}

MAX_HEAVY_ATOMS = 10


def _canonical(smiles: str):
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def _excluded(smiles: str, held_out: set) -> bool:
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None or smiles in held_out or mol.GetNumHeavyAtoms() > MAX_HEAVY_ATOMS:
        return True
    if set(a.GetSymbol() for a in mol.GetAtoms()) - {"C", "N", "O"}:
        return True
    ring_info = mol.GetRingInfo()
    for ring in ring_info.AtomRings():  # aromatic 5-rings with O: furan-like, held out
        atoms = [mol.GetAtomWithIdx(i) for i in ring]
        if len(ring) == 5 and all(a.GetIsAromatic() for a in atoms) and any(
            a.GetSymbol() == "O" for a in atoms
        ):
            return True
    return False


def extra_smiles() -> tuple[str, ...]:
    """Canonical SMILES of the extra training molecules, sorted, held-out ones removed."""
    held_out = {_canonical(s) for s in HELD_OUT_SMILES.values()}
    candidates = [r + x for r in SUBSTITUENTS.values() for x in GROUPS.values()]
    candidates += list(OTHERS)
    out = set()
    for smiles in candidates:
        canonical = _canonical(smiles)
        if canonical is not None and not _excluded(canonical, held_out):
            out.add(canonical)
    return tuple(sorted(out))


def embed(smiles: str, seed: int):
    """An ase.Atoms of ``smiles`` with hydrogens, embedded by seeded ETKDG + MMFF."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed) % (2**31)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise ValueError(f"RDKit could not embed {smiles}")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=500)
    positions = mol.GetConformer().GetPositions()
    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.positions -= atoms.get_center_of_mass()
    return atoms
