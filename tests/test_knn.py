"""Weighted k-NN on frozen features (paper Sec. 4.1; Wu et al. 2018): votes exp(sim / T), any number of classes."""
import math

import pytest
import torch

from eval_knn import knn_classifier

# Four training points on the unit circle (given unnormalized: the classifier uses cosine similarity).
TRAIN = torch.tensor([[5.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-2.0, 0.0]])  # directions 0, ~37, ~53, 180 degrees
TRAIN_LABELS = torch.tensor([0, 1, 1, 2])
TEST = torch.tensor([[1.0, 0.0], [-0.8, 0.6]])
TEST_LABELS = torch.tensor([0, 2])


def test_hand_computed_weighted_vote():
    """k = 3. Test point (1, 0): similarities 1 (class 0), 0.8 and 0.6 (class 1), -1 (class 2, not a neighbour).
      T = 0.1: class 0 gets e^10 = 22026, class 1 gets e^8 + e^6 = 2981 + 403 = 3384 -> class 0 (right).
      T = 1:   class 0 gets e^1 = 2.718, class 1 gets e^0.8 + e^0.6 = 2.226 + 1.822 = 4.048 -> class 1 (wrong):
      a plain majority vote, which a large T approaches, is outvoted.
    Test point (-0.8, 0.6): similarities -0.8, -0.28, 0, 0.8; neighbours class 2 (0.8), class 1 (0, -0.28).
      T = 0.1: class 2 gets e^8 = 2981, class 1 gets e^0 + e^-2.8 = 1.06 -> class 2 (right).
      T = 1:   class 2 gets e^0.8 = 2.226, class 1 gets 1 + e^-0.28 = 1.756 -> class 2 (right).
    So top-1 is 100% at T = 0.1 and 50% at T = 1; with 3 classes the top-5 always holds the label: 100%."""
    assert math.exp(1) < math.exp(0.8) + math.exp(0.6) and math.exp(10) > math.exp(8) + math.exp(6)
    top1, top5 = knn_classifier(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, k=3, T=0.1, num_classes=3)
    assert (top1, top5) == (100.0, 100.0)
    top1, top5 = knn_classifier(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, k=3, T=1.0, num_classes=3)
    assert (top1, top5) == (50.0, 100.0)


def test_k_larger_than_the_training_set_uses_every_training_image():
    """k = 50 with 4 training images does not crash: all 4 vote. At T = 0.1 the results are those of k = 4."""
    assert knn_classifier(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, k=50, T=0.1, num_classes=3) == \
        knn_classifier(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, k=4, T=0.1, num_classes=3)


def clusters(num_classes, per_class, dim=32, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centers[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("num_classes", [3, 10, 1000])
def test_well_separated_clusters_give_100_percent_for_any_number_of_classes(num_classes):
    """Paper Sec. 4.1: "The nearest neighbor classifier then matches the feature of an image to the k nearest
    stored features that votes for the label." Tight clusters of any number of classes (the official code hard-codes
    1000) are classified perfectly, with the paper's k = 20 and T = 0.07."""
    train, train_labels = clusters(num_classes, per_class=4, seed=0)
    test, test_labels = clusters(num_classes, per_class=1, seed=0)  # same centers, fresh noise
    test = test + 0.05 * torch.randn(test.shape, generator=torch.Generator().manual_seed(1))
    top1, top5 = knn_classifier(train, train_labels, test, test_labels, k=20, T=0.07, num_classes=num_classes)
    assert (top1, top5) == (100.0, 100.0)


def test_fewer_than_100_test_images():
    """7 test images (the official code fails below 100): accuracies are multiples of 100/7."""
    train, train_labels = clusters(5, per_class=10)
    test, test_labels = train[::7][:7] + 0.01, train_labels[::7][:7].clone()
    test_labels[0] = (test_labels[0] + 1) % 5  # one wrong label: 6 of 7 right
    top1, top5 = knn_classifier(train, train_labels, test, test_labels, k=20, T=0.07, num_classes=5)
    assert top1 == pytest.approx(100.0 * 6 / 7)
    assert top5 == pytest.approx(100.0 * 6 / 7)  # the mislabelled one's class got no vote: not a top-5 guess


def test_test_set_larger_than_one_chunk():
    """Test images are processed in chunks: 600 images (3 chunks of 256) are all counted."""
    train, train_labels = clusters(10, per_class=5)
    test, test_labels = clusters(10, per_class=60, seed=0)
    top1, _ = knn_classifier(train, train_labels, test, test_labels, k=5, T=0.07, num_classes=10)
    assert top1 == 100.0
    wrong = (test_labels + 1) % 10
    wrong[:300] = test_labels[:300]  # exactly half right
    top1, _ = knn_classifier(train, train_labels, test, wrong, k=5, T=0.07, num_classes=10)
    assert top1 == 50.0
