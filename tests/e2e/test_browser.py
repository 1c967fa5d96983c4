"""A person with a real browser (headless Chromium, driven by Selenium): opens the
link from their copy on a phone-sized screen, presses the button, reads the
confirmation, and may undo it. Screenshots are kept in tests/e2e/artifacts/."""

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from helpers import PURPOSES, WAIT, consent_history, delivered, purpose_verdict, subscribe_and_mail

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NEWS = PURPOSES["consent"]
# No sandbox (we run as root), no GPU, and nothing that phones home: this machine has
# no network but the package registries.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# A phone's screen (Chromium's own windows are at least 500 px wide).
PHONE = {"deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 2.0}}


def find(program: str) -> str:
    path = shutil.which(program)
    if not path:
        pytest.fail(f"{program} is not installed (tests/run installs Debian's chromium and chromium-driver)")
    return path


@pytest.fixture(scope="module")
def gate(launch_shared, upstream):
    return launch_shared(upstream.port)


@pytest.fixture
def browser(tmp_path):
    """Starts headless Chromium with a fresh profile for a language; quits it at the end."""
    drivers = []

    def start(lang: str):
        options = webdriver.ChromeOptions()
        options.binary_location = find("chromium")
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / f'profile-{lang}'}", f"--lang={lang}"]:
            options.add_argument(flag)
        options.add_experimental_option("prefs", {"intl.accept_languages": lang})
        options.add_experimental_option("mobileEmulation", PHONE)
        service = Service(executable_path=find("chromedriver"), log_output=str(tmp_path / f"chromedriver-{lang}.log"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_page_load_timeout(WAIT)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


def screenshot(driver, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / name)), name


def heading(driver) -> str:
    return driver.find_element(By.TAG_NAME, "h1").text


def press(driver, label: str, expected_heading: str):
    """Clicks the submit button labelled `label` and waits for a page whose heading contains `expected_heading`."""
    [button] = [b for b in driver.find_elements(By.CSS_SELECTOR, "form button[type=submit]") if b.text == label]
    button.click()
    # While the next page loads, Chromium may answer about nodes of the old one
    # ("Node with given id does not belong to the document"): wait through that.
    wait = WebDriverWait(driver, WAIT, ignored_exceptions=(WebDriverException,))
    wait.until(expected_conditions.staleness_of(button))
    wait.until(expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "h1"), expected_heading))


def assert_fits_a_phone(driver):
    """Nothing wider than the screen, and a button big enough for a thumb."""
    width = driver.execute_script("return window.innerWidth")
    assert width == PHONE["deviceMetrics"]["width"], width
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    button = driver.find_element(By.CSS_SELECTOR, "form button[type=submit]")
    assert button.size["height"] >= 44, button.size


def test_unsubscribe_with_the_button_then_undo(gate, upstream, browser):
    """In Chromium the link opens a page naming the newsletter; pressing "Unsubscribe" shows "You are unsubscribed" and stops the mail; "Subscribe again" brings it back."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS)
    driver = browser("en")

    driver.get(urls[NEWS])
    assert heading(driver) == "Unsubscribe"
    assert "News" in driver.find_element(By.TAG_NAME, "main").text
    assert_fits_a_phone(driver)
    screenshot(driver, "unsubscribe-page-en.png")

    press(driver, "Unsubscribe", "unsubscribed")
    screenshot(driver, "unsubscribed-en.png")
    assert "unsubscribed" in heading(driver).lower()
    shown = gate.cli_ok("consent", "show", rcpt)
    assert purpose_verdict(shown, NEWS) == "no: consent withdrawn"
    last = consent_history(shown)[-1]
    assert (last["action"], last["source"], last["evidence"]["method"]) == ("withdraw", "unsubscribe-page", "page")
    assert "Chrome" in last["evidence"]["user_agent"] and last["evidence"]["ip"] == "127.0.0.1"
    assert last["evidence"]["lang"] == "en" and last["evidence"].get("wording_version"), last
    assert delivered(gate, upstream, rcpt, NEWS) is False

    press(driver, "Subscribe again", "subscribed again")
    screenshot(driver, "resubscribed-en.png")
    shown = gate.cli_ok("consent", "show", rcpt)
    assert purpose_verdict(shown, NEWS).startswith("yes")
    assert consent_history(shown)[-1]["source"] == "unsubscribe-page-undo"
    assert delivered(gate, upstream, rcpt, NEWS) is True


def test_french_browser_sees_french_pages(gate, upstream, browser):
    """A Chromium set to French reads "Se désinscrire", and after the button "Vous êtes désinscrit(e)"."""
    rcpt, urls = subscribe_and_mail(gate, upstream, NEWS)
    driver = browser("fr")

    driver.get(urls[NEWS])
    assert heading(driver) == "Se désinscrire"
    screenshot(driver, "unsubscribe-page-fr.png")
    press(driver, "Se désinscrire", "désinscrit")
    screenshot(driver, "unsubscribed-fr.png")

    last = consent_history(gate.cli_ok("consent", "show", rcpt))[-1]
    assert (last["action"], last["source"], last["evidence"]["lang"]) == ("withdraw", "unsubscribe-page", "fr")
